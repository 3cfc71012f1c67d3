"""Appending to an execution's stream past its bystanders.

A repeat of a delivery is recorded on its execution's stream, as its webhook.duplicate: it moves
the stream's version, not the execution's dispatch or replay. A dispatcher's claim or outcome, or
an operator's replay, that expected the version before such events alone still stands, and is
appended after them; anything else on the stream (an attempt, another replay) took it over.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.appender import Appender
from ledger.commands import Appended
from ledger.errors import StreamVersionConflict
from ledger.events import NewEvent, WebhookDuplicate
from ledger.schema import events
from server.remote import RemoteAppender

BYSTANDERS = frozenset({WebhookDuplicate.TYPE})


async def append_past_bystanders(
    appender: Appender | RemoteAppender,
    engine: AsyncEngine,
    new: Sequence[NewEvent],
    expected: int,
) -> list[Appended] | None:
    """`new` appended to its stream at version `expected`, or after bystanders appended since;
    None when something else was (the caller's view of the execution is no longer true)."""
    stream = new[0].stream
    while True:
        try:
            appended: list[Appended] = await appender.append(list(new), expected_version=expected)
            return appended
        except StreamVersionConflict as conflict:
            if not await _bystanders_only(engine, stream, expected, conflict.actual):
                return None
            expected = conflict.actual


async def _bystanders_only(engine: AsyncEngine, stream: str, after: int, until: int) -> bool:
    """Whether the events of `stream` after version `after`, up to `until`, are all ones that
    take no part in its dispatch (a repeat's webhook.duplicate)."""
    query = sa.select(events.c.type).where(
        events.c.stream == stream, events.c.version > after, events.c.version <= until
    )
    async with engine.connect() as conn:
        types = set((await conn.execute(query)).scalars())
    return bool(types) and types <= BYSTANDERS
