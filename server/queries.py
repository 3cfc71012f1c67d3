"""Read paths of the admin API: executions and events, with filters and cursors."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from multidict import MultiMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.codec import parse_time
from ledger.events import JSON, RecordedEvent, execution_stream
from ledger.store import read_events, read_stream
from projections.trigger_executions import STATUSES
from projections.trigger_executions import table as executions
from server.errors import ApiError

MAX_LIMIT = 1000
ERROR_CATEGORIES = ("transient", "permanent")
PUBLIC_COLUMNS = [c for c in executions.c if c.name not in ("version",)]


def bad_query(message: str) -> ApiError:
    return ApiError(400, "invalid_query", message)


def int_param(
    query: Mapping[str, str], name: str, default: int, *, low: int = 0, high: int = 2**62
) -> int:
    value = query.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise bad_query(f"{name} must be an integer") from None
    if not low <= number <= high:
        raise bad_query(f"{name} must be between {low} and {high}")
    return number


def time_param(query: Mapping[str, str], name: str) -> datetime | None:
    value = query.get(name)
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise bad_query(f"{name} must be an ISO-8601 time") from None


def execution_row(row: Any) -> JSON:
    return {str(c.name): row._mapping[c.name] for c in PUBLIC_COLUMNS}


def event_json(event: RecordedEvent) -> JSON:
    return dataclasses.asdict(event)


def _key_contains(part: str, dialect: str) -> sa.ColumnElement[bool]:
    # Keys are case-sensitive, and so is the filter (as the dashboard's matching): SQLite's LIKE
    # folds ASCII case, its instr() does not.
    if dialect == "sqlite":
        return sa.func.instr(executions.c.idempotency_key, part) > 0
    escaped = part.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return executions.c.idempotency_key.like(f"%{escaped}%", escape="\\")


def _execution_filters(query: Mapping[str, str], dialect: str) -> list[sa.ColumnElement[bool]]:
    clauses = []
    for name in ("trigger_id", "status", "error_category"):
        if query.get(name):
            clauses.append(executions.c[name] == query[name])
    if query.get("status") and query["status"] not in STATUSES:
        raise bad_query(f"status must be one of {', '.join(STATUSES)}")
    if query.get("error_category") and query["error_category"] not in ERROR_CATEGORIES:
        raise bad_query(f"error_category must be one of {', '.join(ERROR_CATEGORIES)}")
    if query.get("key"):
        clauses.append(_key_contains(query["key"], dialect))
    if since := time_param(query, "since"):
        clauses.append(executions.c.received_at >= since)
    if until := time_param(query, "until"):
        clauses.append(executions.c.received_at < until)
    return clauses


async def list_executions(conn: AsyncConnection, query: Mapping[str, str]) -> JSON:
    """A page of executions, newest first by default; the cursor is the last execution_id seen.

    Execution ids are UUIDv7, so their order is the order of receipt.
    """
    limit = int_param(query, "limit", 50, low=1, high=MAX_LIMIT)
    direction = query.get("order") or "desc"
    if direction not in ("asc", "desc"):
        raise bad_query("order must be asc or desc")
    ascending = direction == "asc"
    statement = sa.select(*PUBLIC_COLUMNS).where(*_execution_filters(query, conn.dialect.name))
    if cursor := query.get("cursor"):
        column = executions.c.execution_id
        statement = statement.where(column > cursor if ascending else column < cursor)
    order = executions.c.execution_id.asc() if ascending else executions.c.execution_id.desc()
    rows = (await conn.execute(statement.order_by(order).limit(limit + 1))).all()
    page = [execution_row(row) for row in rows[:limit]]
    next_cursor = page[-1]["execution_id"] if len(rows) > limit else None
    return {"executions": page, "next_cursor": next_cursor}


async def get_execution(conn: AsyncConnection, execution_id: str) -> JSON | None:
    row = (
        await conn.execute(
            sa.select(*PUBLIC_COLUMNS).where(executions.c.execution_id == execution_id)
        )
    ).first()
    if row is None:
        return None
    timeline = await read_stream(conn, execution_stream(execution_id))
    return execution_row(row) | {"events": [event_json(e) for e in timeline]}


async def list_events(conn: AsyncConnection, query: MultiMapping[str]) -> JSON:
    after = int_param(query, "after", 0)
    limit = int_param(query, "limit", 100, low=1, high=MAX_LIMIT)
    # `type` may repeat, as on the live feed: a page that read only the first would skip the
    # others' events for a reader that pages, then follows, with the same query.
    types = [t for value in query.getall("type", []) for t in value.split(",") if t] or None
    page = await read_events(
        conn, after=after, limit=limit, types=types, trigger_id=query.get("trigger_id") or None
    )
    return {"events": [event_json(e) for e in page], "next_after": page[-1].seq if page else after}
