"""The store's contract on SQLite and PostgreSQL: appends, concurrency, ordering, enforcement."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import create_pg_database, drop_pg_database
from factories import delivery as make_delivery
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import store
from ledger.appender import Appender, append_batch, append_commands
from ledger.codec import GENESIS_HASH, canonical_bytes, chain_hash, dumps, format_time
from ledger.commands import RecordDelivery
from ledger.errors import StreamVersionConflict
from ledger.events import NewEvent
from ledger.migrate import current_revision, head_revision, upgrade
from ledger.store import (
    LOOP_COMMIT_S,
    SqliteWriter,
    create_engine,
    read_events,
    read_stream,
    write_transaction,
)


@pytest.fixture
async def appender(engine: AsyncEngine) -> Appender:
    appender = Appender(engine)
    task = asyncio.create_task(appender.run())
    yield appender
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await appender.close()


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
    await store._process_write_lock(abandoned).acquire()  # a transaction that never ended
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


# --- the SQLite writer: statements on the loop, BEGIN IMMEDIATE and COMMIT in a thread ---------


@pytest.fixture
async def sqlite_writer(tmp_path: Path) -> AsyncIterator[tuple[AsyncEngine, SqliteWriter, Path]]:
    path = tmp_path / "writer.db"
    engine = create_engine(f"sqlite:///{path}")
    await upgrade(engine)
    writer = SqliteWriter(engine)
    yield engine, writer, path
    writer.close()
    await engine.dispose()


def _append_one(key: str) -> Callable[[sa.Connection], list[Any]]:
    return lambda conn: append_batch(conn, [delivery(key)]).results


async def test_the_writer_keeps_nothing_of_a_failed_transaction(
    sqlite_writer: tuple[AsyncEngine, SqliteWriter, Path],
) -> None:
    engine, writer, _ = sqlite_writer

    def fails_after_writing(conn: sa.Connection) -> None:
        append_batch(conn, [delivery("lost")])
        raise RuntimeError("a bug after the insert")

    with pytest.raises(RuntimeError):
        await writer.run(fails_after_writing)
    await writer.run(_append_one("kept"))  # the writer goes on, on a fresh connection
    async with engine.connect() as conn:
        keys = [e.idempotency_key for e in await read_events(conn)]
    assert keys == ["kept"]


async def test_the_loop_runs_on_while_another_process_holds_the_write_lock(
    sqlite_writer: tuple[AsyncEngine, SqliteWriter, Path],
) -> None:
    engine, writer, path = sqlite_writer
    other = sqlite3.connect(path, isolation_level=None)  # another process's writer, in effect
    other.execute("BEGIN IMMEDIATE")
    try:
        appending = asyncio.create_task(writer.run(_append_one("waited")))
        ticks = 0
        for _ in range(10):  # BEGIN IMMEDIATE waits in the writer's thread, not on the loop
            await asyncio.sleep(0.02)
            ticks += 1
        assert ticks == 10 and not appending.done()
    finally:
        other.execute("ROLLBACK")
        other.close()
    async with asyncio.timeout(10):
        await appending
    async with engine.connect() as conn:
        assert [e.idempotency_key for e in await read_events(conn)] == ["waited"]


async def test_a_cancelled_append_holds_the_write_lock_until_its_commit_ends(
    sqlite_writer: tuple[AsyncEngine, SqliteWriter, Path],
) -> None:
    engine, writer, path = sqlite_writer
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    appending = asyncio.create_task(writer.run(_append_one("cancelled")))
    await asyncio.sleep(0.05)  # waiting in BEGIN IMMEDIATE
    appending.cancel()
    await asyncio.sleep(0.05)
    assert not appending.done()  # it waits for its thread before giving the lock back
    other.execute("ROLLBACK")
    other.close()
    with pytest.raises(asyncio.CancelledError):
        await appending
    await writer.run(_append_one("after"))  # nothing of the cancelled one stands in the way
    async with engine.connect() as conn:
        assert [e.idempotency_key for e in await read_events(conn)] == ["after"]


async def test_the_writer_commits_in_its_thread_while_commits_are_slow(
    sqlite_writer: tuple[AsyncEngine, SqliteWriter, Path],
) -> None:
    # Fast commits run on the loop; slow ones (a moving average above LOOP_COMMIT_S) in the
    # writer's thread, where the loop runs on meanwhile. Both commit, and each is timed.
    engine, writer, _ = sqlite_writer
    loop_ran = asyncio.Event()
    asyncio.get_running_loop().call_soon(loop_ran.set)
    await writer.run(_append_one("on the loop"))
    assert not loop_ran.is_set()  # nothing was awaited: it all ran on the loop
    assert 0 < writer._commit_s < LOOP_COMMIT_S
    writer._commit_s = 10.0  # as after a disk that took seconds to sync
    await writer.run(_append_one("in the thread"))
    assert loop_ran.is_set()  # the commit was awaited: the loop ran while it synced
    assert writer._commit_s < 10.0  # this commit's own time moved the average down
    async with engine.connect() as conn:
        keys = [e.idempotency_key for e in await read_events(conn)]
    assert keys == ["on the loop", "in the thread"]


async def test_the_writer_keeps_a_savepoints_journal_in_memory(
    sqlite_writer: tuple[AsyncEngine, SqliteWriter, Path],
) -> None:
    # The inline fold's savepoint journals the pages it changes; on the writer's connection that
    # journal is in memory (no temporary file per transaction), and a rollback to it still undoes
    # exactly what followed it.
    engine, writer, _ = sqlite_writer

    def work(conn: sa.Connection) -> None:
        driver = conn.connection.driver_connection
        assert driver is not None
        assert driver.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
        append_batch(conn, [delivery("kept")])
        driver.execute("SAVEPOINT fold")
        append_batch(conn, [delivery("undone")])
        driver.execute("ROLLBACK TO SAVEPOINT fold")
        driver.execute("RELEASE SAVEPOINT fold")

    await writer.run(work)
    async with engine.connect() as conn:
        assert [e.idempotency_key for e in await read_events(conn)] == ["kept"]


# --- PostgreSQL: the appender's held connection begins its own transactions, lock included ---


@pytest.fixture
async def pg_engine() -> AsyncIterator[AsyncEngine]:
    """A migrated database of its own on PostgreSQL only (SQLite's writer is SqliteWriter)."""
    url = await create_pg_database()
    engine = create_engine(url)
    try:
        await upgrade(engine)
        yield engine
    finally:
        await engine.dispose()
        await drop_pg_database(url)


async def _locks_held(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        query = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :k"
        result = await conn.execute(sa.text(query), {"k": store.APPEND_LOCK_ID})
        return int(result.scalar_one())


async def test_a_held_transaction_holds_the_append_lock_from_its_begin_to_its_commit(
    pg_engine: AsyncEngine,
) -> None:
    held = store.HeldConnection(pg_engine)
    seen: list[int] = []

    def work(conn: sa.Connection) -> list[Any]:
        # Another session sees the lock taken (with BEGIN, before any statement of the append).
        from sqlalchemy.util import await_only

        seen.append(await_only(_locks_held(pg_engine)))
        return append_batch(conn, [make_delivery("one")]).results

    try:
        (outcome,) = await held.run(work)
    finally:
        await held.close()
    assert seen == [1]
    assert await _locks_held(pg_engine) == 0
    async with pg_engine.connect() as conn:
        assert [e.id for e in await read_events(conn)] == [outcome.event_id]


async def test_a_failed_held_transaction_keeps_nothing_and_lets_the_lock_go(
    pg_engine: AsyncEngine,
) -> None:
    held = store.HeldConnection(pg_engine)

    def fails_after_writing(conn: sa.Connection) -> None:
        append_batch(conn, [make_delivery("lost")])
        raise RuntimeError("a bug after the insert")

    def swallows_an_error(conn: sa.Connection) -> None:
        append_batch(conn, [make_delivery("also lost")])
        # A statement fails and its error is swallowed: the transaction is aborted, and
        # PostgreSQL would answer the COMMIT with a ROLLBACK (and no error).
        with contextlib.suppress(sa.exc.DBAPIError):
            store.fetch_all(conn, sa.text("SELECT 1 / 0"))

    try:
        with pytest.raises(RuntimeError):
            await held.run(fails_after_writing)
        assert await _locks_held(pg_engine) == 0  # its connection went, and its lock with it
        with pytest.raises(sa.exc.OperationalError, match="ROLLBACK"):
            await held.run(swallows_an_error)  # never acknowledged as committed
        await held.run(lambda conn: append_batch(conn, [make_delivery("kept")]))
    finally:
        await held.close()
    assert await _locks_held(pg_engine) == 0
    async with pg_engine.connect() as conn:
        assert [e.idempotency_key for e in await read_events(conn)] == ["kept"]
