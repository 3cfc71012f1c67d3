"""What an append reads under its lock before planning: the head of the log, and the original
(webhook.received) of each idempotency key already received, with the version of its stream.

One indexed probe a key on the whole key of the partial unique index, in statements compiled
once (padded to powers of two); on PostgreSQL one statement for any number of keys, which reads
the head in the same round trip.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from ledger.commands import Original
from ledger.events import WebhookReceived, execution_of_stream
from ledger.known import known_log
from ledger.rows import array_of, fetch_all, padded
from ledger.schema import LIMIT_ONE, events, json_text, likely
from ledger.store import head_of, read_head, read_head_statement

# SQLite allows at most 500 terms in a compound SELECT; a larger batch asks in several statements.
ORIGINALS_CHUNK = 256
# What pads a statement's branches (`padded`): the index's first entry, where a probe ends at
# once. A key repeated instead was looked up again in each padding branch: a duplicate's whole
# read (its row, its body's hash, its stream's version) up to a third of a batch's probes. Were
# it ever found, no command asks for its original.
_NO_KEY = ("", "")


def originals_queries(
    keys: set[tuple[str, str]], dialect: str
) -> Iterator[tuple[sa.Executable, dict[str, Any]]]:
    """The statements that find the webhook.received of each (trigger, key), with parameters:
    on PostgreSQL one for any number of keys, which reads the head of the log too
    (`_HEAD_AND_ORIGINALS`: its rows lead with the head's seq and hash), on SQLite one per
    `ORIGINALS_CHUNK` keys."""
    ordered = sorted(keys)
    if dialect == "postgresql":
        if ordered:
            triggers = [trigger_id for trigger_id, _ in ordered]
            asked = {"triggers": triggers, "keys": [key for _, key in ordered]}
            yield _HEAD_AND_ORIGINALS, asked
        return
    for start in range(0, len(ordered), ORIGINALS_CHUNK):
        chunk = padded(ordered[start : start + ORIGINALS_CHUNK], _NO_KEY)
        params: dict[str, Any] = {}
        for n, (trigger_id, key) in enumerate(chunk):
            params[f"trigger_{n}"] = trigger_id
            params[f"key_{n}"] = key
        yield _originals_statement(len(chunk)), params


def _originals_lateral() -> sa.Select[Any]:
    # PostgreSQL: the keys as two arrays, each probed by a LATERAL subquery on the whole key of
    # the partial unique index (LIMIT 1: a nested loop whatever the statistics say), so one
    # plan with one index scan serves any batch. A UNION ALL of a branch per key (SQLite's,
    # below) made PostgreSQL plan and start an index scan per key at every execution: ~a tenth
    # of its CPU in an append batch.
    triggers = sa.bindparam("triggers", type_=array_of(events.c.trigger_id.type))
    keys = sa.bindparam("keys", type_=array_of(events.c.idempotency_key.type))
    asked = (
        sa.func.unnest(triggers, keys)
        .table_valued("trigger_id", "idempotency_key")
        .render_derived(name="asked")
    )
    is_received = events.c.type == sa.literal_column(f"'{WebhookReceived.TYPE}'")
    original = (
        sa.select(
            events.c.trigger_id,
            events.c.idempotency_key,
            events.c.id,
            json_text(events.c.data, "body_sha256").label("body_sha256"),
            events.c.stream,
        )
        .where(
            is_received,
            events.c.trigger_id == asked.c.trigger_id,
            events.c.idempotency_key == asked.c.idempotency_key,
        )
        .limit(LIMIT_ONE)
        .lateral("original")
    )
    later = events.alias("later")
    version = (
        sa.select(sa.func.max(later.c.version))
        .where(later.c.stream == original.c.stream)
        .scalar_subquery()
    )
    o = original.c
    return sa.select(
        o.trigger_id, o.idempotency_key, o.id, o.body_sha256, o.stream, version.label("version")
    ).select_from(asked.join(original, sa.true()))


def _head_and_originals() -> sa.Select[Any]:
    # PostgreSQL: the head of the log in the same round trip, on every row (NULL for an empty
    # log), and on a row of its own, the originals' columns NULL, when no key was received
    # before. Read after the append lock was taken (with BEGIN), as `read_head` is.
    one = sa.select(sa.literal_column("1").label("one")).subquery("one")
    head = read_head_statement().subquery("head")
    found = _originals_lateral().subquery("found")
    return sa.select(head.c.seq, head.c.hash, *found.c).select_from(
        one.outerjoin(head, sa.true()).outerjoin(found, sa.true())
    )


_HEAD_AND_ORIGINALS = _head_and_originals()


@functools.lru_cache(maxsize=16)
def _originals_statement(size: int) -> sa.Executable:
    # One branch per key, `type = … AND trigger_id = … AND idempotency_key = …`: the whole key of
    # the partial unique index, equal, so each branch is one probe of it on both backends whatever
    # the planner's statistics say. An IN list was not: PostgreSQL, on a table not yet analysed
    # (a new deployment, a fast-growing log), probed the index on trigger_id alone and filtered
    # every delivery of the trigger for the keys: O(n), 5 ms a batch at 7k events; and SQLite,
    # without statistics, took `type = …` for the selective term and scanned the type index.
    # The type is a literal, so the predicate provably matches the partial index's even in a
    # generic (prepared) plan; likely() tells SQLite's planner it is not the selective term.
    is_received = likely(events.c.type == sa.literal_column(f"'{WebhookReceived.TYPE}'"))
    # And the version of the original's stream (its execution's), read in the same probe: a
    # duplicate is appended to that stream. `uq_events_stream_version` answers max() at once.
    later = events.alias("later")
    version = (
        sa.select(sa.func.max(later.c.version))
        .where(later.c.stream == events.c.stream)
        .scalar_subquery()
    )
    selects = [
        sa.select(
            events.c.trigger_id,
            events.c.idempotency_key,
            events.c.id,
            json_text(events.c.data, "body_sha256"),
            events.c.stream,
            version,
        ).where(
            is_received,
            events.c.trigger_id == sa.bindparam(f"trigger_{n}", type_=events.c.trigger_id.type),
            events.c.idempotency_key
            == sa.bindparam(f"key_{n}", type_=events.c.idempotency_key.type),
        )
        for n in range(size)
    ]
    return selects[0] if len(selects) == 1 else sa.union_all(*selects)


def _read_head_and_originals(
    conn: sa.Connection, keys: set[tuple[str, str]]
) -> tuple[tuple[int, str], dict[tuple[str, str], Original], dict[str, int], bool]:
    """The head of the log; the original of each key already received, and the version of its
    stream: read, or recalled from what `conn` knows of the log (ledger.known) while the head is
    the one it left. And whether any original was read (not known here)."""
    known = known_log(conn)
    if known is None:
        head, originals, versions = _read(conn, keys)
        return head, originals, versions, bool(originals)
    unknown = keys.difference(known.originals)  # (a set less a dict: one lookup a key)
    head, originals, versions = _read(conn, unknown)
    found = bool(originals)
    unread = keys - unknown
    if known.holds(head):  # else forgotten (someone else appended), and read
        recalled, recalled_versions = known.recall(unread)
        originals |= recalled
        versions |= recalled_versions
        unread -= recalled.keys()  # a stream let go before its key
    if unread:
        _, more, more_versions = _read(conn, unread)
        originals |= more
        versions |= more_versions
        found = found or bool(more)
    return head, originals, versions, found


def _read(
    conn: sa.Connection, keys: set[tuple[str, str]]
) -> tuple[tuple[int, str], dict[tuple[str, str], Original], dict[str, int]]:
    # Of the original's data only the body's hash, read by the database: the whole text (the
    # body, the headers) was shipped to Python and parsed there for it, most of a duplicate's
    # read. Its execution is the one whose stream it opened.
    found: list[Sequence[Any]] = []
    if conn.dialect.name == "postgresql" and keys:
        ((statement, params),) = originals_queries(keys, "postgresql")
        rows = fetch_all(conn, statement, params)
        head = head_of(rows[0][0], rows[0][1])
        found = [row[2:] for row in rows if row[2] is not None]
    else:
        head = read_head(conn)
        for statement, params in originals_queries(keys, conn.dialect.name):
            found += fetch_all(conn, statement, params)
    originals, versions = {}, {}
    for trigger_id, key, event_id, sha256, stream, version in found:
        execution_id = execution_of_stream(stream)
        assert execution_id is not None, stream  # a webhook.received opens its execution
        originals[(trigger_id, key)] = Original(event_id, execution_id, sha256)
        versions[stream] = version
    return head, originals, versions
