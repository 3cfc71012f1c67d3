"""Replays: `POST /api/executions/{id}/replay` and the bulk `POST /api/replays`.

A replay is an `execution.replay_requested` event on the execution's own stream, appended with
the stream version the decision was made on: of two concurrent replays exactly one lands, and
a replay never races an attempt. The dispatcher then starts the attempts afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from ledger.codec import parse_time
from ledger.events import ExecutionReplayRequested, NewEvent, execution_stream, uuid7
from ledger.store import read_last_seq, read_stream
from projections.trigger_executions import Row, evolve
from projections.trigger_executions import table as executions
from server.admin import json_body, json_response
from server.bystanders import append_past_bystanders
from server.catalog import read_trigger
from server.errors import ApiError
from server.policy import json_integer
from server.state import SERVICES, Services
from server.triggers import unknown_fields

__all__ = ["BulkReplay", "replay_refusal", "routes"]

routes = web.RouteTableDef()

DEFAULT_REQUESTER = "admin-api"
REPLAYABLE = ("dead_lettered", "succeeded")
_IN_FLIGHT = ("pending", "running", "retrying")
_NEVER_DISPATCHED = {
    "recorded": "its trigger had no destination when it was received",
    "filtered": "its trigger's filter did not match it",
}
_PAGE = 500
_MAX_LIMIT = 1_000_000
_REQUESTER = re.compile(r"^[\x20-\x7e]{1,100}$")
ONE_FIELDS = frozenset({"requested_by"})
BULK_FIELDS = frozenset(
    {"trigger_id", "status", "since", "until", "limit", "dry_run", "requested_by"}
)


def _not_allowed(message: str) -> ApiError:
    return ApiError(409, "replay_not_allowed", message)


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_replay", message)


def replay_refusal(row: Row, *, now: datetime, interval_s: float) -> ApiError | None:
    """Why this execution cannot be replayed now, or None when it can."""
    status = row["status"]
    if status in _IN_FLIGHT:
        return _not_allowed(f"the execution is {status}: it is still being dispatched")
    if status in _NEVER_DISPATCHED:
        return _not_allowed(f"the execution is {status}: {_NEVER_DISPATCHED[status]}")
    last = row["last_replay_at"]
    left = interval_s - (now - last).total_seconds() if last is not None else 0.0
    if left > 0:
        return ApiError(
            429,
            "rate_limited",
            f"this execution was replayed less than {interval_s:g} s ago",
            headers={"Retry-After": str(math.ceil(left))},
        )
    return None


def _requester(payload: Any) -> str:
    value = payload.get("requested_by", DEFAULT_REQUESTER) if isinstance(payload, dict) else None
    if not isinstance(value, str) or not _REQUESTER.fullmatch(value):
        raise _invalid("requested_by must be printable text of at most 100 characters")
    return value


def _replay_event(
    execution_id: str, trigger_id: str, requester: str, bulk_id: str | None
) -> NewEvent:
    payload = ExecutionReplayRequested(requested_by=requester, bulk_id=bulk_id)
    return NewEvent.of(execution_stream(execution_id), trigger_id, payload)


async def _current(services: Services, execution_id: str) -> tuple[Row, Any]:
    """The execution as its stream says now (not the projection, which may lag), and its trigger."""
    async with services.engine.connect() as conn:
        history = await read_stream(conn, execution_stream(execution_id))
        row: Row | None = None
        for event in history:
            row = evolve(row, event)
        if row is None:
            raise ApiError(404, "execution_not_found", "no such execution")
        return row, await read_trigger(conn, row["trigger_id"])


async def request_replay(services: Services, execution_id: str, requester: str) -> None:
    row, trigger = await _current(services, execution_id)
    if trigger is None or trigger.deleted:
        raise _not_allowed("the execution's trigger is deleted")
    if not trigger.destination:
        raise _not_allowed("the execution's trigger has no destination any more")
    now = datetime.now(UTC)
    refusal = replay_refusal(row, now=now, interval_s=services.settings.replay_interval_s)
    if refusal is not None:
        raise refusal
    event = _replay_event(execution_id, row["trigger_id"], requester, None)
    appended = await append_past_bystanders(
        services.appender, services.engine, [event], row["version"]
    )
    if appended is None:
        raise _not_allowed("the execution changed meanwhile (another replay or an attempt)")
    await services.runner.wait_for(appended[-1].seq)


@routes.post("/api/executions/{execution_id}/replay")
async def replay_execution(request: web.Request) -> web.Response:
    execution_id = request.match_info["execution_id"]
    payload = await json_body(request)
    if isinstance(payload, dict) and (message := unknown_fields(payload, ONE_FIELDS)):
        raise _invalid(message)  # its body's only field is requested_by
    requester = _requester(payload)
    await request_replay(request.app[SERVICES], execution_id, requester)
    return json_response({"execution_id": execution_id, "status": "pending"}, 202)


def _time(payload: dict[str, Any], name: str) -> datetime | None:
    value = payload.get(name)
    if value is None:
        return None
    try:
        return parse_time(str(value))
    except ValueError:
        raise _invalid(f"{name} must be an ISO-8601 time") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkReplay:
    """Which executions a bulk replay takes: one trigger's, by status and time of receipt."""

    trigger_id: str
    status: str = "dead_lettered"
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = None
    dry_run: bool = False

    @classmethod
    def parse(cls, payload: Any) -> BulkReplay:
        if not isinstance(payload, dict):
            raise _invalid("the body must be a JSON object")
        if message := unknown_fields(payload, BULK_FIELDS):
            raise _invalid(message)
        trigger_id, status = payload.get("trigger_id"), payload.get("status", "dead_lettered")
        if not isinstance(trigger_id, str) or not trigger_id:
            raise _invalid("trigger_id is required")
        if "\x00" in trigger_id:  # PostgreSQL text cannot hold it: no trigger has it
            raise _invalid("trigger_id must not contain a NUL character")
        if status not in REPLAYABLE:
            raise _invalid(f"status must be one of {', '.join(REPLAYABLE)}")
        limit = payload.get("limit")
        if limit is not None:
            limit = json_integer(limit)
            if limit is None or not 1 <= limit <= _MAX_LIMIT:
                raise _invalid(f"limit must be an integer from 1 to {_MAX_LIMIT}")
        if not isinstance(payload.get("dry_run", False), bool):
            raise _invalid("dry_run must be true or false")
        return cls(
            trigger_id=trigger_id,
            status=status,
            since=_time(payload, "since"),
            until=_time(payload, "until"),
            limit=limit,
            dry_run=payload.get("dry_run", False),
        )

    def clauses(self, now: datetime, interval_s: float) -> list[sa.ColumnElement[bool]]:
        e = executions.c
        clauses = [e.trigger_id == self.trigger_id, e.status == self.status]
        if self.since is not None:
            clauses.append(e.received_at >= self.since)
        if self.until is not None:
            clauses.append(e.received_at < self.until)
        # Executions replayed moments ago are left out, as a single replay would refuse them.
        recent = now - timedelta(seconds=interval_s)
        clauses.append(sa.or_(e.last_replay_at.is_(None), e.last_replay_at <= recent))
        return clauses


async def _catch_up(services: Services) -> None:
    """Let the projection reach the head, so the selection sees every recent dead letter."""
    async with services.engine.connect() as conn:
        head = await read_last_seq(conn)
    with contextlib.suppress(TimeoutError):  # stale rows are safe: their versions conflict
        await services.runner.wait_for(head, timeout=5.0)


async def count_replayable(services: Services, bulk: BulkReplay, now: datetime) -> int:
    clauses = bulk.clauses(now, services.settings.replay_interval_s)
    async with services.engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(executions).where(*clauses)
        count = (await conn.execute(query)).scalar_one()
    return int(count) if bulk.limit is None else min(int(count), bulk.limit)


async def _page(
    services: Services, clauses: Sequence[sa.ColumnElement[bool]], after: str, size: int
) -> list[Any]:
    e = executions.c
    query = (
        sa.select(e.execution_id, e.trigger_id, e.version)
        .where(*clauses, e.execution_id > after)
        .order_by(e.execution_id)
        .limit(size)
    )
    async with services.engine.connect() as conn:
        return list((await conn.execute(query)).all())


async def _replay_row(services: Services, row: Any, requester: str, bulk_id: str) -> int | None:
    event = _replay_event(row.execution_id, row.trigger_id, requester, bulk_id)
    appended = await append_past_bystanders(
        services.appender, services.engine, [event], row.version
    )
    if appended is None:
        return None  # it changed since it was selected: someone else replayed it, or it is running
    return int(appended[-1].seq)


async def bulk_replay(
    services: Services, bulk: BulkReplay, requester: str, now: datetime
) -> tuple[int, str]:
    """Replay each selected execution once, page by page; (replayed, bulk_id)."""
    bulk_id, replayed, last_seq, after = uuid7(), 0, 0, ""
    clauses = bulk.clauses(now, services.settings.replay_interval_s)
    remaining = bulk.limit if bulk.limit is not None else _MAX_LIMIT
    while remaining > 0:
        page = await _page(services, clauses, after, min(_PAGE, remaining))
        if not page:
            break
        # Submitted together, the appends of one page share a few group commits.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_replay_row(services, r, requester, bulk_id)) for r in page]
        landed = [seq for task in tasks if (seq := task.result()) is not None]
        # `limit` counts replays: a row taken over since it was read (replayed by someone else,
        # say) leaves its place to the next one that qualifies.
        replayed, remaining, after = (
            replayed + len(landed),
            remaining - len(landed),
            page[-1].execution_id,
        )
        last_seq = max([last_seq, *landed])
    if last_seq:
        await services.runner.wait_for(last_seq)
    return replayed, bulk_id


@routes.post("/api/replays")
async def replay_executions(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    payload = await json_body(request)
    bulk, requester = BulkReplay.parse(payload), _requester(payload)
    async with services.engine.connect() as conn:
        trigger = await read_trigger(conn, bulk.trigger_id)
    if trigger is None:
        raise ApiError(404, "trigger_not_found", f"no trigger {bulk.trigger_id!r}")
    if trigger.deleted:
        raise _not_allowed("the trigger is deleted")
    if not trigger.destination:
        raise _not_allowed("the trigger has no destination to replay to")
    await _catch_up(services)
    now = datetime.now(UTC)
    if bulk.dry_run:
        return json_response({"would_replay": await count_replayable(services, bulk, now)})
    replayed, bulk_id = await bulk_replay(services, bulk, requester, now)
    return json_response({"replayed": replayed, "bulk_id": bulk_id}, 202)
