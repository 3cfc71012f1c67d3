"""Which executions are due: a page of `trigger_executions` joined with their triggers.

Due means: `pending`/`retrying` with `next_attempt_at` passed, or `running` with its lease run
out (the fold keeps the lease's end in `next_attempt_at`), and the trigger not paused; or waiting
executions of a deleted trigger, which are then dead-lettered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import yarl
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.codec import loads
from ledger.events import JSON
from ledger.schema import likely
from projections.trigger_executions import DISPATCHABLE
from projections.trigger_executions import table as executions
from projections.triggers import table as triggers
from server.policy import DEFAULT_RETRY_POLICY, RetryPolicy

__all__ = ["Due", "destination_key", "find_due", "policy_of"]

DEFAULT_TIMEOUT_S = 10.0


def policy_of(retry: JSON | None) -> RetryPolicy:
    return RetryPolicy.from_json(retry) if retry else DEFAULT_RETRY_POLICY


@dataclass(frozen=True, slots=True, kw_only=True)
class Due:
    """An execution whose next step is due, with what its trigger says about it."""

    execution_id: str
    trigger_id: str
    status: str
    attempts: int
    version: int
    idempotency_key: str | None
    received_event_id: str
    trigger_deleted: bool
    destination: JSON | None
    retry: JSON | None

    @classmethod
    def of(cls, row: Any) -> Due:
        return cls(
            execution_id=row.execution_id,
            trigger_id=row.trigger_id,
            status=row.status,
            attempts=row.attempts,
            version=row.version,
            idempotency_key=row.idempotency_key,
            received_event_id=row.received_event_id,
            trigger_deleted=row.deleted,
            destination=loads(row.destination) if row.destination else None,
            retry=loads(row.retry) if row.retry else None,
        )

    @property
    def timeout_s(self) -> float:
        return float((self.destination or {}).get("timeout_s") or DEFAULT_TIMEOUT_S)

    @property
    def policy(self) -> RetryPolicy:
        return policy_of(self.retry)


_HELD_BY_DELETION = ("pending", "retrying")

# Whose executions wait for a resume, not for the dispatcher: a paused trigger's. A deleted one
# is never resumed, so its pause holds nothing any more (a lease that ran out under a paused,
# then deleted trigger would stay running for good). The backlog gauge leaves them out too.
HELD_BY_PAUSE = sa.and_(triggers.c.paused, sa.not_(triggers.c.deleted))


def _branches(now: datetime) -> list[sa.ColumnElement[bool]]:
    e, t = executions.c, triggers.c
    # One branch per dispatchable status, each a walk of the (status, next_attempt_at) index in
    # time order that stops at the page's size: O(page) a poll, however many are due (after an
    # outage, all of them). An OR of the statuses made both planners visit every pending and
    # retrying row at each poll; one IN made them sort every due row for the first page.
    runnable = [
        sa.and_(e.status == status, e.next_attempt_at <= now, sa.not_(HELD_BY_PAUSE))
        for status in DISPATCHABLE
    ]
    # A deleted trigger's waiting executions are dead-lettered at once, paused or not
    # (ix_trigger_executions_trigger_id_status: the deleted trigger's waiting rows only).
    deleted = sa.select(triggers.c.id).where(triggers.c.deleted).scalar_subquery()
    abandoned = sa.and_(
        e.trigger_id.in_(deleted), likely(e.status.in_(_HELD_BY_DELETION)), t.deleted
    )
    return [*runnable, abandoned]


def due_query(
    now: datetime,
    limit: int,
    skip_executions: Sequence[str] = (),
    skip_triggers: Sequence[str] = (),
) -> sa.Select[Any]:
    """The statement `find_due` runs (its query plans are tested): each branch's first `limit`
    rows by time, then the first `limit` of those."""
    e, t = executions.c, triggers.c
    pages = []
    for branch in _branches(now):
        select = (
            sa.select(
                e.execution_id,
                e.trigger_id,
                e.status,
                e.attempts,
                e.version,
                e.idempotency_key,
                e.received_event_id,
                e.next_attempt_at,
                t.deleted,
                t.destination,
                t.retry,
            )
            .join_from(executions, triggers, t.id == e.trigger_id)
            .where(branch)
        )
        if skip_executions:
            select = select.where(e.execution_id.not_in(list(skip_executions)))
        if skip_triggers:
            select = select.where(e.trigger_id.not_in(list(skip_triggers)))
        page = select.order_by(e.next_attempt_at).limit(limit).subquery()
        pages.append(sa.select(page))
    union = sa.union_all(*pages).subquery()
    return sa.select(union).order_by(union.c.next_attempt_at).limit(limit)


async def find_due(
    conn: AsyncConnection,
    *,
    now: datetime,
    limit: int,
    skip_executions: Sequence[str] = (),
    skip_triggers: Sequence[str] = (),
) -> list[Due]:
    """At most `limit` due executions, the longest-waiting first (one page: memory stays flat)."""
    query = due_query(now, limit, skip_executions, skip_triggers)
    found: dict[str, Due] = {}
    for row in (await conn.execute(query)).all():
        # A deleted trigger's due row answers both branches: once is enough.
        found.setdefault(row.execution_id, Due.of(row))
    return list(found.values())


def destination_key(due: Due) -> str:
    """Concurrency is bounded per destination origin (scheme, host, port), across triggers."""
    url = str((due.destination or {}).get("url", ""))
    try:
        return str(yarl.URL(url).origin())
    except (ValueError, IndexError):  # IndexError: see server/addresses.py `_parse_url`
        return url
