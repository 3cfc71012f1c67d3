"""The store's contract on SQLite and PostgreSQL: appends, concurrency, ordering, enforcement."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from factories import delivery as make_delivery
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import store
from ledger.append import append_commands
from ledger.appender import Appender
from ledger.codec import GENESIS_HASH, canonical_bytes, chain_hash, dumps, format_time
from ledger.commands import AppendEvents, DeliveryOutcome, RecordDelivery
from ledger.errors import StreamVersionConflict
from ledger.events import NewEvent, RecordedEvent
from ledger.migrate import current_revision, head_revision, upgrade
from ledger.schema import events, json_text
from ledger.store import (
    create_engine,
    plain_sqlite_engine,
    read_events,
    read_stream,
    write_transaction,
)
from ledger.writers import SqliteWriter


def event(stream: str = "s-1", n: int = 0) -> NewEvent:
    return NewEvent(stream=stream, type="test.happened", trigger_id="t", data={"n": n})


def delivery(key: str | None, body: str = "{}", trigger_id: str = "t") -> RecordDelivery:
    return make_delivery(key, body, trigger_id, initial_status="recorded")


async def test_append_then_read_back_in_order(engine: AsyncEngine, appender: Appender) -> None:
    appended = await appender.append([event(n=1), event(n=2)], expected_version=0)
    assert [a.version for a in appended] == [1, 2]
    async with engine.connect() as conn:
        read = await read_events(conn, after=0, limit=10)
        stream = await read_stream(conn, "s-1")
    assert [e.data["n"] for e in read] == [1, 2]
    assert [e.seq for e in read] == [a.seq for a in appended]
    assert [e.version for e in stream] == [1, 2]
    assert read[0].recorded_at.tzinfo is not None


async def test_an_event_read_back_has_every_column_in_its_field(
    engine: AsyncEngine, appender: Appender
) -> None:
    # `to_recorded` restores a RecordedEvent from the row by position: its fields must be the
    # table's columns in the same order, and each must hold its own column's value.
    assert [f.name for f in dataclasses.fields(RecordedEvent)] == [c.name for c in events.c]
    (appended,) = await appender.append([event(n=7)], expected_version=0)
    async with engine.connect() as conn:
        (read,) = await read_events(conn, after=0, limit=10)
        (row,) = (await conn.execute(sa.select(events))).all()
    assert (read.seq, read.id, read.stream, read.version) == (
        appended.seq,
        appended.event_id,
        "s-1",
        1,
    )
    assert (read.type, read.trigger_id, read.idempotency_key) == ("test.happened", "t", None)
    assert read.data == {"n": 7} and read.meta == {}
    assert (read.recorded_at, read.hash) == (row.recorded_at, row.hash)
    assert read == dataclasses.replace(read)  # equal to one made through __init__


async def test_expected_version_conflict_appends_nothing(
    engine: AsyncEngine, appender: Appender
) -> None:
    await appender.append([event()], expected_version=0)
    with pytest.raises(StreamVersionConflict) as caught:
        await appender.append([event()], expected_version=0)
    assert caught.value.actual == 1
    async with engine.connect() as conn:
        assert len(await read_events(conn, limit=10)) == 1


async def test_racing_appends_with_one_expected_version_one_wins(
    engine: AsyncEngine, appender: Appender
) -> None:
    results = await asyncio.gather(
        *(appender.append([event(n=i)], expected_version=0) for i in range(20)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, StreamVersionConflict) for r in results if isinstance(r, Exception))


async def test_hash_chain_links_each_event_to_the_previous(
    engine: AsyncEngine, appender: Appender
) -> None:
    for i in range(3):
        await appender.append([event(stream=f"s-{i}")])
    async with engine.connect() as conn:
        read = await read_events(conn, limit=10)
    previous = GENESIS_HASH
    for e in read:
        canonical = canonical_bytes(
            seq=e.seq,
            id=e.id,
            stream=e.stream,
            version=e.version,
            type=e.type,
            trigger_id=e.trigger_id,
            idempotency_key=e.idempotency_key,
            data=dumps(e.data),
            meta=dumps(e.meta),
            recorded_at=format_time(e.recorded_at),
        )
        previous = chain_hash(previous, canonical)
        assert e.hash == previous


async def test_update_and_delete_on_events_are_refused_by_the_database(
    engine: AsyncEngine, appender: Appender
) -> None:
    await appender.append([event()])
    for statement in ("UPDATE events SET data = '{}'", "DELETE FROM events"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            async with engine.begin() as conn:
                await conn.exec_driver_sql(statement)
    async with engine.connect() as conn:
        assert len(await read_events(conn, limit=10)) == 1


COLUMNS = (
    "seq, id, stream, version, type, trigger_id, idempotency_key, data, meta, recorded_at, hash"
)
TAMPERED = COLUMNS.replace(" type,", " 'tampered.type',")
ANOTHER = (
    COLUMNS.replace("seq,", "seq + 1000,")
    .replace(" id,", " id || '-x',")
    .replace(" stream,", " stream || '-x',")
)
# What would change a stored event, each backend's spellings: an insert over it too.
CHANGES = {
    "sqlite": [
        f"INSERT OR REPLACE INTO events ({COLUMNS}) SELECT {TAMPERED} FROM events WHERE seq = 1",
        f"REPLACE INTO events ({COLUMNS}) SELECT {TAMPERED} FROM events WHERE seq = 1",
        # Conflicting on the idempotency index alone: the original would go, a new seq come.
        f"INSERT OR REPLACE INTO events ({COLUMNS}) SELECT {ANOTHER} FROM events"
        " WHERE type = 'webhook.received'",
        f"INSERT INTO events ({COLUMNS}) SELECT {COLUMNS} FROM events WHERE seq = 1"
        " ON CONFLICT DO UPDATE SET type = 'tampered.type'",
        "UPDATE OR REPLACE events SET type = 'tampered.type' WHERE seq = 1",
        "UPDATE events SET type = 'tampered.type'",
        "DELETE FROM events",
    ],
    "postgres": [
        f"INSERT INTO events ({COLUMNS}) SELECT {COLUMNS} FROM events WHERE seq = 1"
        " ON CONFLICT (seq) DO UPDATE SET type = 'tampered.type'",
        "UPDATE events SET type = 'tampered.type'",
        "DELETE FROM events",
        "TRUNCATE events",
    ],
}


async def stored_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.exec_driver_sql(f"SELECT {COLUMNS} FROM events")).all())


async def test_every_change_to_a_stored_event_is_refused_on_every_connection_of_hookledger(
    engine: AsyncEngine, appender: Appender, backend: str
) -> None:
    """SQLite's REPLACE deletes the row it conflicts with without its delete trigger, unless
    the connection turned recursive triggers on: each of hookledger's connections does."""
    await appender.append([event(n=1), event(n=2)])
    await appender.submit(delivery("k"))
    before = await stored_rows(engine)
    writer = SqliteWriter(engine) if backend == "sqlite" else None
    plain = plain_sqlite_engine(engine) if backend == "sqlite" else None
    try:
        for statement in CHANGES[backend]:
            # The server's engine (the runner, the admin API, migrations and the CLI)
            with pytest.raises(sa.exc.DBAPIError, match="append-only"):
                async with engine.begin() as conn:
                    await conn.exec_driver_sql(statement)
            if writer is not None and plain is not None:
                # the appender's own connection
                with pytest.raises(sa.exc.DBAPIError, match="append-only"):
                    await writer.run(lambda conn, sql=statement: conn.exec_driver_sql(sql))
                # a rebuild's (and what else plainly opens the file)
                with pytest.raises(sa.exc.DBAPIError, match="append-only"), plain.begin() as conn:
                    conn.exec_driver_sql(statement)
            assert await stored_rows(engine) == before, statement
    finally:
        if writer is not None and plain is not None:
            writer.close()
            plain.dispose()


async def test_duplicate_detection_uses_the_idempotency_index(
    engine: AsyncEngine, backend: str
) -> None:
    async with write_transaction(engine) as conn:
        await append_commands(conn, [delivery(f"k{i}") for i in range(200)])
    query = (
        "SELECT trigger_id, idempotency_key, id, data FROM events "
        "WHERE type = 'webhook.received' AND trigger_id = 't' AND idempotency_key IN ('k1', 'k2')"
    )
    async with engine.connect() as conn:
        if backend == "postgres":
            await conn.exec_driver_sql("ANALYZE events")
            await conn.exec_driver_sql("SET enable_seqscan = off")
            plan = "\n".join(r[0] for r in await conn.exec_driver_sql("EXPLAIN " + query))
        else:
            plan = "\n".join(
                str(r[-1]) for r in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query)
            )
    assert "uq_events_trigger_id_idempotency_key" in plan, plan


async def test_the_database_reads_a_field_of_json_text_that_holds_a_nul_elsewhere(
    engine: AsyncEngine, appender: Appender, backend: str
) -> None:
    # PostgreSQL's JSON functions refused a \u0000 escape anywhere in the text (ledger.schema
    # json_text): a body kept as text may hold a NUL. The escape may follow a backslash, escaped
    # or not: the text must stay JSON.
    data = {"body": "a\x00b", "escaped": "\\u0000", "both": "\\\x00", "id": "x"}
    stored = NewEvent(stream="s-1", type="test.happened", trigger_id="t", data=data)
    await appender.append([stored], expected_version=0)
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(json_text(events.c.data, "id"))) == "x"
        escaped = await conn.scalar(sa.select(json_text(events.c.data, "escaped")))
    # On PostgreSQL every \u0000 escape reads as \ufffd, even one whose backslash was escaped.
    assert escaped == ("\\ufffd" if backend == "postgres" else "\\u0000")


async def test_an_event_that_cannot_be_encoded_fails_its_own_command_not_its_batch(
    engine: AsyncEngine, appender: Appender
) -> None:
    # orjson reads 1,024 levels of nesting but writes 254 (FACTS.md): data parsed from a request
    # (an admin's trigger filter) can be deeper than it can store. Its command fails alone; the
    # deliveries and appends of its batch (the same loop turn: one batch) are committed.
    deep: Any = "x"
    for _ in range(300):
        deep = [deep]
    unwritable = NewEvent(stream="s-2", type="test.happened", trigger_id="t", data={"deep": deep})
    before, bad, after, delivered = await asyncio.gather(
        appender.append([event("s-1", 1)]),
        appender.append([unwritable]),
        appender.append([event("s-1", 2)]),
        appender.submit(delivery("k")),
        return_exceptions=True,
    )
    assert isinstance(bad, TypeError), bad
    assert isinstance(delivered, DeliveryOutcome), delivered
    assert not delivered.is_duplicate
    assert [a.version for a in before + after] == [1, 2]
    async with engine.connect() as conn:
        logged = await read_events(conn)
    assert [(e.seq, e.stream) for e in logged] == [
        (1, "s-1"),
        (2, "s-1"),
        (3, f"execution-{delivered.execution_id}"),
    ]


async def test_in_batch_and_cross_batch_duplicates(engine: AsyncEngine) -> None:
    async with write_transaction(engine) as conn:
        first = await append_commands(
            conn, [delivery("a"), delivery("a", body="[1]"), delivery(None)]
        )
    async with write_transaction(engine) as conn:
        second = await append_commands(conn, [delivery("a")])
    assert [r.is_duplicate for r in first] == [False, True, False]
    assert first[1].body_matches is False
    assert second[0].is_duplicate and second[0].original_event_id == first[0].event_id
    assert second[0].execution_id == first[0].execution_id
    async with engine.connect() as conn:
        timeline = await read_stream(conn, f"execution-{first[0].execution_id}")
    assert [e.type for e in timeline] == [
        "webhook.received",
        "webhook.duplicate",
        "webhook.duplicate",
    ]
    assert timeline[1].data["body"] == "[1]"


async def test_upgrade_is_idempotent_and_keeps_events(
    engine: AsyncEngine, appender: Appender
) -> None:
    await appender.append([event()])
    assert await upgrade(engine) == head_revision()
    assert await current_revision(engine) == head_revision()
    async with engine.connect() as conn:
        assert len(await read_events(conn, limit=10)) == 1


async def test_concurrent_appenders_never_let_a_reader_skip(database_url: str) -> None:
    """Several engines (connection pools) append at once while a reader tails `after=seq`."""
    engines = [create_engine(database_url) for _ in range(4)]
    await upgrade(engines[0])
    appenders = [Appender(e, max_batch=7) for e in engines]
    tasks = [asyncio.create_task(a.run()) for a in appenders]
    seen: list[int] = []
    done = asyncio.Event()

    async def tail() -> None:
        after = 0
        while True:
            finished = done.is_set()
            async with engines[0].connect() as conn:
                page = await read_events(conn, after=after, limit=50)
            seen.extend(e.seq for e in page)
            after = page[-1].seq if page else after
            if finished and not page:
                return

    async def write(appender: Appender, n: int) -> None:
        for i in range(60):
            await asyncio.gather(
                *(appender.append([event(stream=f"w{n}-{i}-{j}")]) for j in range(3))
            )

    reader = asyncio.create_task(tail())
    await asyncio.gather(*(write(a, n) for n, a in enumerate(appenders)))
    done.set()
    await reader
    async with engines[0].connect() as conn:
        final = [e.seq for e in await read_events(conn, limit=10_000)]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for a in appenders:
        await a.close()
    for e in engines:
        await e.dispose()
    assert len(final) == 4 * 60 * 3
    assert seen == final
    assert final == list(range(1, len(final) + 1))


async def test_commits_are_durable_by_configuration(engine: AsyncEngine, backend: str) -> None:
    async with engine.connect() as conn:
        if backend == "postgres":
            setting = (await conn.exec_driver_sql("SHOW synchronous_commit")).scalar()
            assert setting == "on"
        else:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 2  # FULL


async def test_a_new_engine_never_inherits_an_abandoned_write_lock(tmp_path: Path) -> None:
    """An SQLite engine's in-process write lock lives and dies with that engine.

    Keyed by id(), a new engine allocated where a collected one lived inherited its lock, still
    held by a transaction that a closed event loop had abandoned: every write then waited forever
    (seen in CI as a test that hung until its 300 s timeout).
    """
    abandoned = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    await store.process_write_lock(abandoned).acquire()  # a transaction that never ended
    gone = weakref.ref(abandoned.sync_engine)
    del abandoned
    gc.collect()
    assert gone() is None  # the registry does not keep an engine alive
    # ... nor its lock: no held lock is left for a newcomer at the same address to find.
    assert not any(lock.locked() for lock in store._write_locks.values())
    fresh = create_engine(f"sqlite:///{tmp_path / 'new.db'}")
    try:
        await upgrade(fresh)
        async with asyncio.timeout(5):
            async with write_transaction(fresh) as conn:
                assert (await conn.execute(sa.text("SELECT 1"))).scalar() == 1
    finally:
        await fresh.dispose()


async def test_an_answered_command_hears_its_result_inside_the_appenders_own_step(
    engine: AsyncEngine,
) -> None:
    # The ledger link's way: no future, the answer is called by the writer itself right after
    # the commit (so it can be written before the loop turns to other input). Results and
    # per-command errors alike; an answer that raises does not stop the writer.
    appender = Appender(engine)
    writing = asyncio.create_task(appender.run())
    heard: list[tuple[object, bool]] = []

    def answer(result: object) -> None:
        heard.append((result, asyncio.current_task() is writing))

    def broken(_result: object) -> None:
        raise RuntimeError("an answer that fails")

    try:
        first = appender.enqueue(delivery("k-1"))
        appender.enqueue_answered(delivery("k-1"), answer)
        appender.enqueue_answered(AppendEvents(events=[event()], expected_version=3), answer)
        appender.enqueue_answered(delivery("k-2"), broken)
        original = await first
        later = await appender.submit(delivery("k-3"))  # the writer goes on
    finally:
        writing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writing
        await appender.close()
    (duplicate, in_step), (conflict, conflict_in_step) = heard
    assert in_step and conflict_in_step
    assert isinstance(duplicate, DeliveryOutcome) and duplicate.is_duplicate
    assert duplicate.original_event_id == original.event_id
    assert isinstance(conflict, StreamVersionConflict)
    assert not later.is_duplicate
    async with engine.connect() as conn:
        keys = [e.idempotency_key for e in await read_events(conn, after=0, limit=10)]
    assert keys == ["k-1", "k-1", "k-2", "k-3"]


async def test_a_command_its_caller_gave_up_is_left_out_and_the_writer_goes_on(
    engine: AsyncEngine,
) -> None:
    # An appender with no wait's limit (the CLI's, the tests'): a caller that cancels its wait
    # (its request went away) leaves its command out of the batch, and the writer lives on.
    appender = Appender(engine)
    kept = appender.enqueue(delivery("kept"))
    appender.enqueue(delivery("given up")).cancel()  # before the writer takes the batch
    async with appender.running():
        await asyncio.wait_for(kept, 10)
        await asyncio.wait_for(appender.submit(delivery("later")), 10)  # the writer goes on
    async with engine.connect() as conn:
        keys = [e.idempotency_key for e in await read_events(conn, after=0, limit=10)]
    assert keys == ["kept", "later"]


async def test_big_bodies_are_stored_whole_and_on_postgresql_compressed_with_lz4(
    engine: AsyncEngine, appender: Appender, backend: str
) -> None:
    # Most senders' payloads are over the ~2 KB at which PostgreSQL compresses a row's values:
    # `events.data` uses lz4 there (migration 0005; pglz cost ~1.8x the CPU a delivery).
    body = dumps({"commits": [{"id": f"{n:040x}", "message": "fix " * 40} for n in range(60)]})
    assert len(body) > 10_000
    outcome = await appender.submit(delivery("big-1", body))
    async with engine.connect() as conn:
        (stored,) = await read_events(conn, after=outcome.seq - 1, limit=1)
        assert stored.data["body"] == body
        if backend != "postgres":
            return
        available = (
            await conn.exec_driver_sql(
                "SELECT count(*) FROM pg_settings"
                " WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)"
            )
        ).scalar()
        if not available:
            pytest.skip("this PostgreSQL was built without lz4")
        method = (
            await conn.execute(
                sa.text("SELECT pg_column_compression(data) FROM events WHERE seq = :seq"),
                {"seq": outcome.seq},
            )
        ).scalar()
    assert method == "lz4"


def test_sqlite_binds_a_null_through_the_adapter_registry_and_stores_null(tmp_path: Path) -> None:
    """The ledger answers sqlite3's adapter lookup for None itself (ledger/store.py): without it,
    every NULL bound (eight in an execution's row) took the protocol's slow path. A NULL is
    still stored as NULL, through any connection of the process."""
    import sqlite3

    assert sqlite3.adapters.get((type(None), sqlite3.PrepareProtocol)) is store._null
    conn = sqlite3.connect(tmp_path / "nulls.db")
    try:
        conn.execute("CREATE TABLE t (a TEXT, b INTEGER)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", [(None, 1), ("x", None)])
        rows = conn.execute("SELECT a, b, typeof(a), typeof(b) FROM t ORDER BY rowid").fetchall()
    finally:
        conn.close()
    assert rows == [(None, 1, "null", "integer"), ("x", None, "text", "null")]
