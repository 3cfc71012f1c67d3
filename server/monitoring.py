"""What operators watch: `/metrics`, readiness, and the receiver's outcomes as facts and counts.

Gauges that live in the database (executions by status, dispatcher backlog, projector lag) are
read at scrape time, so every process reports the shared truth, whichever one projects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.schema import events
from projections.runner import read_checkpoints_and_head
from projections.trigger_executions import DISPATCHABLE, STATUSES
from projections.trigger_executions import table as executions
from projections.triggers import table as triggers
from server.config import Settings
from server.due import HELD_BY_PAUSE
from server.logs import fact
from server.metrics import CONTENT_TYPE
from server.receiver import Receipt, count_answer
from server.remote import RemoteMetrics
from server.state import RECEIPT, SERVICES, Services

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

READY_TIMEOUT_S = 2.0
SCRAPE_TIMEOUT_S = 5.0

Lag = dict[str, tuple[int, float]]  # projection -> (events behind, seconds behind)


async def read_lag(conn: AsyncConnection, names: Sequence[str]) -> Lag:
    """How far each projection is behind: events, and the age of the oldest one not folded in."""
    positions, head = await read_checkpoints_and_head(conn)  # one snapshot
    now = datetime.now(UTC)
    lag: Lag = {}
    for name in names:
        position = positions.get(name, 0)
        seconds = 0.0
        if position < head:
            query = sa.select(events.c.recorded_at).where(events.c.seq == position + 1)
            oldest = (await conn.execute(query)).scalar()
            seconds = max(0.0, (now - oldest).total_seconds()) if oldest else 0.0
        lag[name] = (head - position, seconds)
    return lag


async def read_executions_by_status(conn: AsyncConnection) -> dict[str, int]:
    query = sa.select(executions.c.status, sa.func.count()).group_by(executions.c.status)
    counts = dict.fromkeys(STATUSES, 0)
    counts.update({status: count for status, count in (await conn.execute(query)).all()})
    return counts


async def read_backlog(conn: AsyncConnection) -> int:
    """Executions due now: pending or retrying whose time has come, or running past their lease."""
    # A paused trigger holds its executions (server/due.py): they wait for a resume, not for the
    # dispatcher, and a backlog that counted them would never drain.
    held = sa.select(triggers.c.id).where(HELD_BY_PAUSE)
    query = sa.select(sa.func.count()).where(
        executions.c.status.in_(DISPATCHABLE),
        executions.c.next_attempt_at <= datetime.now(UTC),
        executions.c.trigger_id.not_in(held),
    )
    return int((await conn.execute(query)).scalar_one())


def _projection_names(services: Services) -> list[str]:
    return [p.name for p in services.runner.projections]


@routes.get("/metrics")
async def get_metrics(request: web.Request) -> web.Response:
    metrics = request.app[SERVICES].metrics
    if isinstance(metrics, RemoteMetrics):  # an ingest worker shows the main process's registry
        body = await metrics.page()
    else:
        body = await metrics_page(request.app[SERVICES])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def metrics_page(services: Services) -> bytes:
    """The Prometheus page: gauges read from the database now, counts as this process kept them."""
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT_S), services.engine.connect() as conn:
            snapshot: dict[str, Any] = {
                "executions": await read_executions_by_status(conn),
                "backlog": await read_backlog(conn),
                "lag": await read_lag(conn, _projection_names(services)),
            }
        services.metrics.set_gauges(**snapshot)
    except Exception as exc:  # noqa: BLE001 - a scrape reports the outage instead of failing
        fact(logger, "metrics_database_unreachable", logging.WARNING, cause=repr(exc))
        services.metrics.set_database_down()
    return services.metrics.render()


def _sqlite_file(settings: Settings) -> Path | None:
    if not settings.is_sqlite:
        return None
    database = make_url(settings.database_url).database
    return Path(database) if database and database != ":memory:" else None


async def readiness(services: Services) -> tuple[bool, dict[str, Any]]:
    """Ready: the database answers (SQLite: its file is where it should be) and the projections
    are less than `ready_max_lag_s` behind."""
    path = _sqlite_file(services.settings)
    if path is not None and not path.exists():
        # Open connections would go on writing to a file nobody can find again.
        return False, {"status": "not_ready", "reason": f"database file {path} is missing"}
    try:
        async with asyncio.timeout(READY_TIMEOUT_S), services.engine.connect() as conn:
            lag = await read_lag(conn, _projection_names(services))
    except Exception as exc:  # noqa: BLE001 - any failure to reach the database means not ready
        return False, {
            "status": "not_ready",
            "reason": f"database unreachable: {type(exc).__name__}",
        }
    body = {
        "status": "ready",
        "projection_lag": {name: events for name, (events, _) in lag.items()},
        "projection_lag_seconds": {name: round(seconds, 3) for name, (_, seconds) in lag.items()},
    }
    behind = sorted(name for name, (_, s) in lag.items() if s > services.settings.ready_max_lag_s)
    if behind:
        return False, body | {
            "status": "not_ready",
            "reason": f"projections behind: {', '.join(behind)}",
        }
    return True, body


def _error_code(response: web.StreamResponse) -> str:
    body = getattr(response, "body", None)
    try:
        return str(orjson.loads(body)["error"]["code"])  # type: ignore[arg-type]
    except (TypeError, ValueError, KeyError):
        return f"http_{response.status}"


def record_outcome(request: web.Request, response: web.StreamResponse) -> None:
    """Count an answer to a request on the receiver's route (server.receiver.count_answer)."""
    receipt = request.get(RECEIPT) or Receipt()  # none: refused before the receiver ran (405)
    if response.status < 400:
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        code = "duplicate" if replayed else ""
    else:
        code = _error_code(response)
    trigger_id = request.match_info.get("trigger_id", "")
    count_answer(request.app[SERVICES].metrics, receipt, trigger_id, response.status, code)


def setup(app: web.Application) -> None:
    services = app[SERVICES]
    if services.metrics.observe_append not in services.appender.commit_listeners:
        services.appender.commit_listeners.append(services.metrics.observe_append)
    app.router.add_routes(routes)
