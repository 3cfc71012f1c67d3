"""What the appender's connection knows of the log (ledger/known.py): a duplicate of a key it
appended or read lately is planned without reading its original, and only while nothing else
appended since. On SQLite's writer and PostgreSQL's held connection, real databases."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from factories import delivery as make_delivery
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import known as known_module
from ledger.append import append_and_fold, append_commands
from ledger.chain import verify_chain
from ledger.commands import AppendEvents, Command, DeliveryOutcome, PlanState
from ledger.events import NewEvent, execution_stream
from ledger.held import HeldConnection
from ledger.known import KnownLog, known_log
from ledger.rows import fetch_all
from ledger.store import read_events, write_transaction
from ledger.writers import SqliteWriter

T = TypeVar("T")
Run = Callable[[Callable[[sa.Connection], T]], Awaitable[T]]


@contextlib.asynccontextmanager
async def _appending(engine: AsyncEngine) -> AsyncIterator[Run[Any]]:
    """The appender's own way of running a transaction on `engine`'s backend."""
    if engine.dialect.name == "postgresql":
        held = HeldConnection(engine)
        try:
            yield held.run
        finally:
            await held.close()
        return
    writer = SqliteWriter(engine)
    try:
        yield writer.run
    finally:
        writer.close()


# PostgreSQL reads the head and the originals in one prepared statement, SQLite the originals in
# their own, which alone read the version of each original's stream (ledger/originals.py).
_READS_ORIGINALS = "FROM events AS later"
_PG_ORIGINALS_READS = sa.text(
    "SELECT coalesce(sum(generic_plans + custom_plans), 0) FROM pg_prepared_statements"
    " WHERE statement LIKE 'SELECT head.seq%'"
)


def _appended(
    *commands: Command, asking: str = ""
) -> Callable[[sa.Connection], tuple[list[Any], int]]:
    """A transaction appending `commands`: their results, and how many times it read
    originals from the log (on SQLite, only reads that asked for the key `asking`, if given)."""

    def work(conn: sa.Connection) -> tuple[list[Any], int]:
        if conn.dialect.name == "postgresql":
            before = int(fetch_all(conn, _PG_ORIGINALS_READS)[0][0])
            results = append_and_fold(conn, commands, None)[0].results
            return results, int(fetch_all(conn, _PG_ORIGINALS_READS)[0][0]) - before
        driver = conn.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        statements: list[str] = []
        driver.set_trace_callback(statements.append)
        try:
            results = append_and_fold(conn, commands, None)[0].results
        finally:
            driver.set_trace_callback(None)
        asked = f"'{asking}'" if asking else ""
        return results, sum(_READS_ORIGINALS in sql and asked in sql for sql in statements)

    return work


async def _stream_versions(engine: AsyncEngine, stream: str) -> list[tuple[str, int]]:
    async with engine.connect() as conn:
        return [(e.type, e.version) for e in await read_events(conn) if e.stream == stream]


async def test_a_duplicate_of_a_key_the_connection_appended_reads_no_original(
    engine: AsyncEngine,
) -> None:
    async with _appending(engine) as run:
        ([first], reads) = await run(_appended(make_delivery("a")))
        assert reads == 1  # nothing known yet
        ([again], reads) = await run(_appended(make_delivery("a", body='{"other": 1}')))
        assert reads == 0
        ([new], _) = await run(_appended(make_delivery("b")))
    assert again.is_duplicate and not new.is_duplicate
    assert again.original_event_id == first.event_id
    assert again.execution_id == first.execution_id
    assert not again.body_matches  # the original's hash, recalled
    stream = execution_stream(first.execution_id)
    versions = await _stream_versions(engine, stream)
    assert versions == [("webhook.received", 1), ("webhook.duplicate", 2)]
    assert (await verify_chain(engine)).ok


async def test_after_another_connection_appended_the_original_is_read_again(
    engine: AsyncEngine,
) -> None:
    """Another process appends to the original's stream: the version the connection knew is
    stale, and a duplicate planned on it would break the stream's unique version."""
    async with _appending(engine) as run:
        ([first], _) = await run(_appended(make_delivery("a")))
        stream = execution_stream(first.execution_id)
        started = NewEvent(stream=stream, type="execution.noted", trigger_id="t", data={})
        async with write_transaction(engine) as conn:
            await append_commands(conn, [AppendEvents(events=[started], expected_version=1)])
        ([again], _) = await run(_appended(make_delivery("a")))
        ([later], reads) = await run(_appended(make_delivery("a")))
    assert again.is_duplicate and later.is_duplicate
    assert again.original_event_id == later.original_event_id == first.event_id
    assert reads == 0  # known again, from the append that read it
    versions = await _stream_versions(engine, stream)
    assert versions == [
        ("webhook.received", 1),
        ("execution.noted", 2),
        ("webhook.duplicate", 3),
        ("webhook.duplicate", 4),
    ]
    assert (await verify_chain(engine)).ok


async def test_a_transaction_that_failed_teaches_nothing(engine: AsyncEngine) -> None:
    def fails_after_appending(conn: sa.Connection) -> None:
        append_and_fold(conn, [make_delivery("lost")], None)
        raise RuntimeError("a bug after the insert")

    async with _appending(engine) as run:
        await run(_appended(make_delivery("kept")))
        with pytest.raises(RuntimeError):
            await run(fails_after_appending)
        ([outcome], _) = await run(_appended(make_delivery("lost")))
    assert isinstance(outcome, DeliveryOutcome) and not outcome.is_duplicate
    async with engine.connect() as conn:
        assert [e.idempotency_key for e in await read_events(conn)] == ["kept", "lost"]


async def test_what_is_known_is_bounded_and_a_key_let_go_is_read(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keys in use stay; the others go, and are read again when they come back."""
    monkeypatch.setattr(known_module, "CAPACITY", 4)
    async with _appending(engine) as run:
        ([hot], _) = await run(_appended(make_delivery("hot")))
        firsts, hot_reads = [], 0
        for n in range(10):
            batch = (make_delivery(f"k{n}"), make_delivery("hot"))
            ([first, again], reads) = await run(_appended(*batch, asking="hot"))
            firsts.append(first)
            hot_reads += reads
            assert again.is_duplicate and again.original_event_id == hot.event_id
        kept = await run(lambda conn: _kept(known_log(conn)))
        ([cold], reads) = await run(_appended(make_delivery("k0")))
    assert len(kept[0]) <= 4 and kept[1] <= 4
    assert hot_reads == 0 and ("t", "hot") in kept[0]  # recalled at every batch: never the oldest
    assert ("t", "k0") not in kept[0]
    assert cold.is_duplicate and cold.original_event_id == firsts[0].event_id
    assert reads == 1
    assert (await verify_chain(engine)).ok


def _kept(known: KnownLog | None) -> tuple[set[tuple[str, str]], int]:
    """The keys known, and how many streams' versions."""
    assert known is not None
    return set(known.originals), len(known.versions)


# --- KnownLog alone ---------------------------------------------------------------------------


def _learned(head: tuple[int, str], known: KnownLog | None = None) -> KnownLog:
    known = known or KnownLog()
    original = make_delivery("a")
    stream = execution_stream(original.execution_id)
    key = ("t", "a")
    state = PlanState({stream: 1}, {})
    state.originals[key] = known_module.Original("event-1", original.execution_id, "hash")
    known.learn(head, state, unread_next=False)
    return known


def test_a_head_that_differs_forgets_everything() -> None:
    known = _learned((1, "h1"))
    assert known.holds((1, "h1"))
    assert set(known.recall([("t", "a"), ("t", "b")])[0]) == {("t", "a")}
    assert not known.holds((2, "h2"))
    assert known.recall([("t", "a")]) == ({}, {})
    assert not known.holds((1, "h1"))  # forgotten for good, until it learns again


def test_an_original_whose_stream_version_was_let_go_is_not_recalled() -> None:
    known = _learned((1, "h1"))
    known.versions.clear()
    assert known.recall([("t", "a")]) == ({}, {})
