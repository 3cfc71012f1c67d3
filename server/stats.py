"""`GET /api/stats`: per trigger and UTC day counts and dispatch latency, from `trigger_stats`.

Totals per trigger merge the days' histograms (no reread of the log). Their `dead_lettered` is
the number of executions dead-lettered now (trigger_executions), not a count over the days: a
replayed dead letter leaves it. The per-day rows count `execution.dead_lettered` events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.events import JSON
from projections import histogram
from projections.trigger_executions import table as executions
from projections.trigger_stats import COUNTERS
from projections.trigger_stats import table as trigger_stats
from server.admin import json_response
from server.queries import int_param
from server.state import SERVICES

routes = web.RouteTableDef()

MAX_DAYS = 3660
# The counts of an answer: the projection's, and SPEC's `failed` (every failed attempt) next to
# its split by error category, which the projection keeps.
_SPLIT = COUNTERS.index("failed_transient")
COUNTS = (*COUNTERS[:_SPLIT], "failed", *COUNTERS[_SPLIT:])
PERCENTILES = (("latency_p50_ms", 0.50), ("latency_p95_ms", 0.95), ("latency_p99_ms", 0.99))


def latency_fields(merged: Mapping[int, int]) -> dict[str, float | None]:
    return {name: histogram.percentile(merged, q) for name, q in PERCENTILES}


def counts_of(counters: Mapping[str, int]) -> dict[str, int]:
    """The answer's counts (`COUNTS`, in order) from the projection's counters."""
    failed = counters["failed_transient"] + counters["failed_permanent"]
    return {name: failed if name == "failed" else counters[name] for name in COUNTS}


def day_json(row: Any) -> JSON:
    counts = counts_of(row)
    latency = latency_fields(histogram.loads(row["latency_histogram"]))
    return {"trigger_id": row["trigger_id"], "day": row["day"].isoformat(), **counts, **latency}


def _totals(rows: Sequence[Any], dead_now: Mapping[str, int]) -> dict[str, JSON]:
    by_trigger: dict[str, list[Any]] = {}
    for row in rows:
        by_trigger.setdefault(row["trigger_id"], []).append(row)
    totals = {}
    for trigger_id in sorted(set(by_trigger) | set(dead_now)):
        days = by_trigger.get(trigger_id, [])
        counts = {name: sum(row[name] for row in days) for name in COUNTERS}
        merged = histogram.merge(histogram.loads(row["latency_histogram"]) for row in days)
        totals[trigger_id] = {
            **counts_of(counts),
            "dead_lettered": dead_now.get(trigger_id, 0),
            "dead_lettered_events": counts["dead_lettered"],
            "latency_samples": sum(merged.values()),
            **latency_fields(merged),
        }
    return totals


async def _dead_lettered_now(conn: AsyncConnection, trigger_id: str | None) -> dict[str, int]:
    query = (
        sa.select(executions.c.trigger_id, sa.func.count())
        .where(executions.c.status == "dead_lettered")
        .group_by(executions.c.trigger_id)
    )
    if trigger_id:
        query = query.where(executions.c.trigger_id == trigger_id)
    return {tid: count for tid, count in (await conn.execute(query)).all()}


async def read_stats(
    conn: AsyncConnection, *, days: int, trigger_id: str | None = None, today: date | None = None
) -> JSON:
    """The last `days` UTC days (today included), per trigger and day, and totals per trigger."""
    today = today or datetime.now(UTC).date()
    since = today - timedelta(days=days - 1)
    query = sa.select(trigger_stats).where(
        trigger_stats.c.day >= since, trigger_stats.c.day <= today
    )
    if trigger_id:
        query = query.where(trigger_stats.c.trigger_id == trigger_id)
    order = (trigger_stats.c.trigger_id, trigger_stats.c.day)
    rows = (await conn.execute(query.order_by(*order))).mappings().all()
    dead_now = await _dead_lettered_now(conn, trigger_id)
    return {
        "since": since.isoformat(),
        "until": today.isoformat(),
        "stats": [day_json(row) for row in rows],
        "totals": _totals(rows, dead_now),
    }


@routes.get("/api/stats")
async def get_stats(request: web.Request) -> web.Response:
    days = int_param(request.query, "days", 7, low=1, high=MAX_DAYS)
    trigger_id = request.query.get("trigger_id") or None
    async with request.app[SERVICES].engine.connect() as conn:
        return json_response(await read_stats(conn, days=days, trigger_id=trigger_id))
