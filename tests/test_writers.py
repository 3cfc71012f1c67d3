"""The appender's write transactions: SQLite's writer on the event loop, with BEGIN IMMEDIATE
and slow COMMITs in a thread (ledger/writers.py); PostgreSQL's held connection, which begins its
own transactions with the append lock (ledger/held.py). Real SQLite files, the real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from factories import delivery as make_delivery
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger import store, writers
from ledger.append import append_and_fold, append_batch, append_commands
from ledger.chain import verify_chain
from ledger.commands import AppendEvents, Command
from ledger.events import NewEvent
from ledger.held import HeldConnection
from ledger.migrate import upgrade
from ledger.rows import fetch_all
from ledger.schema import projection_checkpoints
from ledger.store import create_engine, read_events
from ledger.writers import LOOP_COMMIT_S, SqliteWriter
from projections.base import Projection

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


def _driver(conn: sa.Connection) -> sqlite3.Connection:
    driver = conn.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver


def _append_one(key: str) -> Callable[[sa.Connection], list[Any]]:
    return lambda conn: append_batch(conn, [make_delivery(key)]).results


async def test_the_writer_keeps_nothing_of_a_failed_transaction(
    sqlite_writer: tuple[AsyncEngine, SqliteWriter, Path],
) -> None:
    engine, writer, _ = sqlite_writer

    def fails_after_writing(conn: sa.Connection) -> None:
        append_batch(conn, [make_delivery("lost")])
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


async def test_the_writers_transaction_is_begun_on_the_driver_and_sqlalchemy_joins_it(
    sqlite_writer: tuple[AsyncEngine, SqliteWriter, Path],
) -> None:
    # BEGIN IMMEDIATE and COMMIT go to the driver; a statement run through SQLAlchemy in `work`
    # (which begins its own transaction) runs inside that one, and is committed with it.
    engine, writer, _ = sqlite_writer

    def work(conn: sa.Connection) -> None:
        assert _driver(conn).in_transaction
        append_batch(conn, [make_delivery("driver")])
        conn.execute(
            projection_checkpoints.insert().values(
                name="through sqlalchemy", seq=1, updated_at=datetime.now(UTC)
            )
        )

    await writer.run(work)
    await writer.run(_append_one("next"))
    async with engine.connect() as conn:
        keys = [e.idempotency_key for e in await read_events(conn)]
        names = (await conn.execute(sa.select(projection_checkpoints.c.name))).scalars().all()
    assert keys == ["driver", "next"]
    assert "through sqlalchemy" in names


async def test_the_writer_keeps_a_savepoints_journal_in_memory(
    sqlite_writer: tuple[AsyncEngine, SqliteWriter, Path],
) -> None:
    # The appender's savepoint journals pages it changes; on the writer's connection that
    # journal is in memory (no temporary file per transaction), and a rollback to it still undoes
    # exactly what followed it.
    engine, writer, _ = sqlite_writer

    def work(conn: sa.Connection) -> None:
        driver = _driver(conn)
        assert driver.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
        append_batch(conn, [make_delivery("kept")])
        driver.execute("SAVEPOINT fold")
        append_batch(conn, [make_delivery("undone")])
        driver.execute("ROLLBACK TO SAVEPOINT fold")
        driver.execute("RELEASE SAVEPOINT fold")

    await writer.run(work)
    async with engine.connect() as conn:
        assert [e.idempotency_key for e in await read_events(conn)] == ["kept"]


def _in_database_file(path: Path) -> int:
    """Events in the database file alone, without its WAL: what checkpoints copied there; -1
    for a read torn by a checkpoint writing the file meanwhile (`immutable=1` takes no lock, so
    it may see one page before and another after: "malformed"). Callers poll (`_until`) or read
    when no checkpoint runs, so a file really damaged still fails them."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as conn:
            tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'events'")
            if not tables.fetchone()[0]:
                return 0  # not even the schema was copied yet
            return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    except sqlite3.DatabaseError:
        return -1


def _appends(keys: range, body: str) -> Callable[[sa.Connection], None]:
    def work(conn: sa.Connection) -> None:
        append_batch(conn, [make_delivery(f"k-{n}", body) for n in keys])

    return work


async def _until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


_BODY = '{"padding": "' + "x" * 3000 + '"}'  # about a page of the log a delivery


async def test_the_writers_commits_never_checkpoint_the_wal_its_thread_does(
    sqlite_writer: tuple[AsyncEngine, SqliteWriter, Path],
) -> None:
    # A checkpoint inside a COMMIT copied ~4 MiB into the database file and synced it on the
    # loop, with every batch queued behind it: the writer's connection never checkpoints, and
    # the checkpointer's thread copies the WAL into the database file.
    _, writer, path = sqlite_writer
    await writer.run(_appends(range(10), _BODY))
    await _until(lambda: _in_database_file(path) == 10)  # the thread copied them
    writer.checkpointer.close()  # from here on, only a COMMIT could checkpoint
    checked = writer.checkpointer.checkpoints
    for start in range(10, 1510, 100):  # ~1,500 pages: past SQLite's own 1,000
        await writer.run(_appends(range(start, start + 100), _BODY))
    assert _in_database_file(path) == 10
    assert writer.checkpointer.checkpoints == checked
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size > 1000 * 4096


@pytest.fixture
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart past 64 frames, a checkpoint every 5 ms: a test's few pages are enough."""
    monkeypatch.setattr(writers, "RESTART_FRAMES", 64)
    monkeypatch.setattr(writers, "CHECKPOINT_EVERY_S", 0.005)


@pytest.mark.usefixtures("quick_restarts")
async def test_the_wal_starts_over_while_appends_keep_coming(
    sqlite_writer: tuple[AsyncEngine, SqliteWriter, Path],
) -> None:
    # A PASSIVE checkpoint alone never lets the WAL start over under steady appends (a writer
    # restarts it only when its transaction begins with every frame copied, between two
    # commits): past RESTART_FRAMES the checkpointer asks for a RESTART, and the WAL file stops
    # growing with the log.
    engine, writer, path = sqlite_writer
    sent = 0
    while sent < 3000:  # ~3,000 pages of log, in batches of 20: ~12 MiB through the WAL
        await writer.run(_appends(range(sent, sent + 20), _BODY))
        sent += 20
        await asyncio.sleep(0.001)
    await _until(lambda: writer.checkpointer.restarts >= 3)
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size < 1500 * 4096  # far less than what went through it
    async with engine.connect() as conn:
        assert len(await read_events(conn, limit=5000)) == 3000
    await _until(lambda: _in_database_file(path) == 3000)


@pytest.fixture
def no_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpointer's thread waits an hour between ticks: the test plays its part."""
    monkeypatch.setattr(writers, "RESTART_FRAMES", 64)
    monkeypatch.setattr(writers, "CHECKPOINT_EVERY_S", 3600.0)


def _wal_restarts(path: Path) -> int:
    """The WAL header's checkpoint sequence number: one more each time the WAL starts over (the
    first commit after a restart writes the header anew). Read from the file, changing nothing."""
    header = path.with_name(path.name + "-wal").read_bytes()[:32]
    return int.from_bytes(header[12:16], "big")


@pytest.mark.usefixtures("no_ticks")
async def test_the_writer_restarts_the_wal_between_its_transactions_when_its_checkpointer_could_not(
    sqlite_writer: tuple[AsyncEngine, SqliteWriter, Path],
) -> None:
    # Under steady appends the checkpointer's RESTART may find a transaction in the way at every
    # tick (a slow disk, a loaded machine): the WAL then grew with the log. The writer gives it
    # the gap: before its next transaction, holding the write lock, it restarts the WAL itself.
    engine, writer, path = sqlite_writer
    for start in range(0, 200, 20):
        await writer.run(_appends(range(start, start + 20), _BODY))
    checkpointer, started = writer.checkpointer, _wal_restarts(path)
    await writer.run(_appends(range(200, 201), _BODY))
    assert checkpointer.restarts == 0 and _wal_restarts(path) == started  # none asked for yet
    checkpointer.owed = checkpointer.gap_wanted = True  # as its tick leaves a busy RESTART
    await writer.run(_appends(range(201, 202), _BODY))
    assert checkpointer.restarts == 1 and not checkpointer.owed and not checkpointer.gap_wanted
    assert _wal_restarts(path) == started + 1  # the last append wrote it from its start
    async with engine.connect() as conn:
        assert len(await read_events(conn, limit=500)) == 202
    assert _in_database_file(path) == 201  # what was in the WAL before, copied first


@pytest.mark.usefixtures("quick_restarts")
async def test_a_reader_holding_the_wal_delays_its_restart_but_never_an_append(
    sqlite_writer: tuple[AsyncEngine, SqliteWriter, Path],
) -> None:
    # A RESTART waits for no lock: while a reader keeps an old snapshot (a long export), it
    # fails and is tried again, appends go on, and the WAL starts over once the reader is done.
    _, writer, path = sqlite_writer
    await writer.run(_appends(range(0, 10), _BODY))
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 10
        for start in range(10, 410, 20):
            await asyncio.wait_for(writer.run(_appends(range(start, start + 20), _BODY)), 2)
        await _until(lambda: writer.checkpointer.largest >= 400)
        assert writer.checkpointer.restarts == 0
        assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 10
        reader.execute("COMMIT")
    await _until(lambda: writer.checkpointer.restarts >= 1)
    await _until(lambda: _in_database_file(path) == 410)


async def test_a_failing_checkpoint_is_said_once_and_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A full disk or an I/O error: the thread says so once (not at every tick), keeps trying,
    # and says when it works again.
    monkeypatch.setattr(writers, "CHECKPOINT_EVERY_S", 0.002)
    path = tmp_path / "file.db"
    sqlite3.connect(path).close()
    failures = 0

    class Failing(writers.WalCheckpointer):
        def step(self, conn: sqlite3.Connection) -> int:
            nonlocal failures
            failures += 1
            if failures <= 20:
                raise sqlite3.OperationalError("disk I/O error")
            return super().step(conn)

    caplog.set_level("INFO", logger="ledger.writers")
    checkpointer = Failing(str(path))
    try:
        checkpointer.commits += 1
        await _until(lambda: checkpointer.checkpoints > 0)
    finally:
        checkpointer.close()
    said = [r.getMessage() for r in caplog.records if r.name == "ledger.writers"]
    assert said == [
        "evt=wal_checkpoint_failed cause=OperationalError('disk I/O error')",
        "evt=wal_checkpoint_recovered",
    ]


async def test_a_checkpointer_on_what_is_not_a_database_says_so_and_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"not a database, " * 512)
    checkpointer = writers.WalCheckpointer(str(path))
    await _until(lambda: not checkpointer.alive)
    checkpointer.close()
    assert [r.getMessage() for r in caplog.records] == ["evt=wal_checkpointer_failed"]


async def test_the_checkpointers_thread_ends_with_the_writer(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'writer.db'}")
    await upgrade(engine)
    writer = SqliteWriter(engine)
    await writer.run(_append_one("one"))
    assert writer.checkpointer.alive
    writer.close()
    assert not writer.checkpointer.alive
    await engine.dispose()


# --- PostgreSQL: the appender's held connection begins its own transactions, lock included ---


async def _locks_held(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        # This database's: the server is shared, and other databases' appenders take the same id.
        query = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :k"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        result = await conn.execute(sa.text(query), {"k": store.APPEND_LOCK_ID})
        return int(result.scalar_one())


async def test_a_held_transaction_holds_the_append_lock_from_its_begin_to_its_commit(
    pg_engine: AsyncEngine,
) -> None:
    held = HeldConnection(pg_engine)
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


def _swallows_an_error(key: str) -> Callable[[sa.Connection], None]:
    def work(conn: sa.Connection) -> None:
        append_batch(conn, [make_delivery(key)])
        # A statement fails and its error is swallowed: the transaction is aborted, and
        # PostgreSQL would answer the COMMIT with a ROLLBACK (and no error).
        with contextlib.suppress(sa.exc.DBAPIError):
            fetch_all(conn, sa.text("SELECT 1 / 0"))

    return work


async def test_a_held_connection_plans_the_read_of_the_head_and_the_originals_once(
    pg_engine: AsyncEngine,
) -> None:
    """Batches of one delivery (a light load) and then of many: PostgreSQL, left to choose,
    plans the read anew at every batch (its first custom plans were cheap, and a generic plan
    never beat their average); the held session keeps one generic plan for good."""
    held = HeldConnection(pg_engine)
    plans = sa.text(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
        " WHERE statement LIKE 'SELECT head.seq%'"
    )
    try:
        for n in range(8):
            await held.run(lambda conn, n=n: append_batch(conn, [make_delivery(f"one-{n}")]))
        for n in range(4):
            batch = [make_delivery(f"many-{n}-{i}") for i in range(40)]
            await held.run(lambda conn, batch=batch: append_batch(conn, batch))
        ((generic, custom),) = await held.run(lambda conn: fetch_all(conn, plans))
    finally:
        await held.close()
    assert (generic, custom) == (12, 0)


_HEAD_AND_ORIGINALS_READS = sa.text(
    "SELECT coalesce(sum(generic_plans + custom_plans), 0) FROM pg_prepared_statements"
    " WHERE statement LIKE 'SELECT head.seq%'"
)


def _append(*commands: Command) -> Callable[[sa.Connection], list[Any]]:
    return lambda conn: append_and_fold(conn, commands, None)[0].results


def _reads(conn: sa.Connection) -> int:
    """How often this session has read the head and the originals (its prepared statement's
    executions)."""
    return int(fetch_all(conn, _HEAD_AND_ORIGINALS_READS)[0][0])


async def test_after_a_batch_that_read_no_original_the_next_is_planned_without_a_read(
    pg_engine: AsyncEngine,
) -> None:
    """Only a batch of deliveries after one that read no original it did not know
    (ledger.known): a known key's delivery is planned as its duplicate, any other as new. A
    batch with other events, the batch after one that read an original, and every batch for a
    second after a batch planned so met a key received before, read the head and the
    originals."""
    async with store.write_transaction(pg_engine) as conn:  # received before the connection
        await append_commands(conn, [make_delivery("before")])
    held = HeldConnection(pg_engine)
    try:
        await held.run(_append(make_delivery("a")))  # nothing expected yet: read
        assert await held.run(_reads) == 1
        await held.run(_append(make_delivery("b"), make_delivery("c")))
        await held.run(_append(make_delivery("d")))
        assert await held.run(_reads) == 1
        started = NewEvent(stream="other-1", type="other.event", trigger_id="t", data={})
        await held.run(_append(make_delivery("e"), AppendEvents(events=[started])))
        assert await held.run(_reads) == 2  # not deliveries alone: read
        await held.run(_append(make_delivery("f")))
        assert await held.run(_reads) == 2  # the batch before read no original: not read
        (known,) = await held.run(_append(make_delivery("a")))  # a key it appended
        await held.run(_append(make_delivery("g")))
        assert known.is_duplicate and await held.run(_reads) == 2  # known: nothing read
        (dup,) = await held.run(_append(make_delivery("before")))  # planned new, then on the log
        assert dup.is_duplicate and await held.run(_reads) == 3
        await held.run(_append(make_delivery("h")))  # after an original read: read
        await held.run(_append(make_delivery("i")))  # within a second of a miss: read
        assert await held.run(_reads) == 5
    finally:
        await held.close()
    keys = ["before", "a", "b", "c", "d", "e", None, "f", "a", "g", "before", "h", "i"]
    assert await _keys(pg_engine) == keys
    assert (await verify_chain(pg_engine)).ok


async def test_a_batch_planned_as_new_after_another_process_appended_is_planned_on_the_log(
    pg_engine: AsyncEngine,
) -> None:
    """The head this connection expects is gone when another process appended (another host,
    the CLI): the batch's first seq is taken, it goes back to its savepoint and is planned
    again on the head of the log; the chain holds, and the original of a key the other process
    received is found."""
    held = HeldConnection(pg_engine)
    try:
        await held.run(_append(make_delivery("mine-1")))
        await held.run(_append(make_delivery("mine-2")))  # expects the head it left
        async with pg_engine.begin() as other:
            await other.run_sync(append_batch, [make_delivery("theirs")])
        theirs, mine = await held.run(_append(make_delivery("theirs"), make_delivery("mine-3")))
        assert theirs.is_duplicate and not mine.is_duplicate
        assert await held.run(_reads) == 2
    finally:
        await held.close()
    assert await _keys(pg_engine) == ["mine-1", "mine-2", "theirs", "theirs", "mine-3"]
    assert (await verify_chain(pg_engine)).ok


async def test_a_batch_planned_as_new_never_expects_the_head_of_a_transaction_that_failed(
    pg_engine: AsyncEngine,
) -> None:
    """A batch whose deliveries were all new, and whose COMMIT then failed (PostgreSQL answered
    ROLLBACK), leaves no head to expect: the next batch reads the log, and chains from what it
    holds."""
    held = HeldConnection(pg_engine)

    def appends_then_fails(conn: sa.Connection) -> None:
        append_and_fold(conn, [make_delivery("lost")], None)
        with contextlib.suppress(sa.exc.DBAPIError):
            fetch_all(conn, sa.text("SELECT 1 / 0"))  # aborted: the COMMIT is a ROLLBACK

    try:
        await held.run(_append(make_delivery("kept")))
        with pytest.raises(sa.exc.OperationalError, match="ROLLBACK"):
            await held.run(appends_then_fails)
        await held.run(_append(make_delivery("next")))
        assert await held.run(_reads) == 1  # the new connection's: it read the log
    finally:
        await held.close()
    assert await _keys(pg_engine) == ["kept", "next"]
    assert (await verify_chain(pg_engine)).ok


async def test_a_held_connection_folds_duplicates_by_index_into_a_table_never_analysed(
    pg_engine: AsyncEngine,
) -> None:
    """A new deployment's `trigger_executions` grows faster than autovacuum analyses it: its
    statistics say a few rows, and a batch's duplicates were folded by a hash join over a
    sequential scan of the whole table (6 ms a batch at 12k rows, O(n)). The held session plans
    nested loops over indexes whatever the statistics say."""
    from projections.registry import PROJECTIONS
    from projections.runner import ProjectionRunner

    runner = ProjectionRunner(pg_engine, list(PROJECTIONS.values()))
    held = HeldConnection(pg_engine)
    scans = sa.text(
        "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables"
        " WHERE relname = 'trigger_executions'"
    )

    def fold(conn: sa.Connection, commands: list[Command]) -> Any:
        appended, folded = append_and_fold(conn, commands, runner)
        assert folded
        return fetch_all(conn, scans)[0]

    try:
        await held.run(_append(make_delivery("first")))
        await runner.catch_up()  # the checkpoints at the head: the folds below are inline
        for n in range(10):
            batch = [make_delivery(f"k-{n}-{i}") for i in range(40)]
            await held.run(lambda conn, batch=batch: fold(conn, batch))
        for n in range(3):
            batch = [make_delivery(f"k-{n}-{i}") for i in range(0, 40, 4)]  # duplicates
            seq_scans, index_scans = await held.run(lambda conn, batch=batch: fold(conn, batch))
            assert seq_scans == 0 and index_scans > 0
    finally:
        await held.close()


async def test_the_projectors_catch_up_folds_duplicates_by_index_into_a_table_never_analysed(
    pg_engine: AsyncEngine,
) -> None:
    """The same folds when the runner catches up (after a restart, or an inline fold that
    failed), on a connection of the pool: its transaction plans by index too. Without it, the
    fold below is one sequential scan of the table and no index scan."""
    from projections.registry import PROJECTIONS
    from projections.runner import ProjectionRunner

    before, after = _ScansOfExecutions("scans_before"), _ScansOfExecutions("scans_after")
    folds = [cast(Projection, before), *PROJECTIONS.values(), cast(Projection, after)]
    runner = ProjectionRunner(pg_engine, folds)
    async with store.write_transaction(pg_engine) as conn:  # not folded: left to the runner
        await append_commands(conn, [make_delivery(f"k-{n}") for n in range(400)])
    await runner.catch_up()
    async with store.write_transaction(pg_engine) as conn:
        await append_commands(conn, [make_delivery(f"k-{n}") for n in range(0, 400, 10)])
    await runner.catch_up()
    (seq_before, index_before), (seq_after, index_after) = before.seen[-1], after.seen[-1]
    seq_scans, index_scans = seq_after - seq_before, index_after - index_before
    assert seq_scans == 0 and index_scans > 0
    async with pg_engine.connect() as conn:
        duplicates = await conn.scalar(
            sa.text("SELECT sum(duplicate_count) FROM trigger_executions")
        )
    assert duplicates == 40


class _ScansOfExecutions:
    """A projection that writes nothing: it notes how often its transaction has scanned
    `trigger_executions` so far, sequentially and by index (the backend's counts not yet
    reported, which may hold its earlier transactions': compare two of them)."""

    table = projection_checkpoints  # any table: nothing is written to it

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[tuple[int, int]] = []

    def apply(self, conn: sa.Connection, table: sa.Table, events: Sequence[Any]) -> None:
        scans = sa.text(
            "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables"
            " WHERE relname = 'trigger_executions'"
        )
        ((seq_scans, index_scans),) = fetch_all(conn, scans)
        self.seen.append((seq_scans, index_scans))


async def test_a_failed_held_transaction_keeps_nothing_and_lets_the_lock_go(
    pg_engine: AsyncEngine,
) -> None:
    held = HeldConnection(pg_engine)

    def fails_after_writing(conn: sa.Connection) -> None:
        append_batch(conn, [make_delivery("lost")])
        raise RuntimeError("a bug after the insert")

    try:
        with pytest.raises(RuntimeError):
            await held.run(fails_after_writing)
        assert await _locks_held(pg_engine) == 0  # its connection went, and its lock with it
        with pytest.raises(sa.exc.OperationalError, match="ROLLBACK"):
            await held.run(_swallows_an_error("also lost"))  # never acknowledged as committed
        await held.run(lambda conn: append_batch(conn, [make_delivery("kept")]))
    finally:
        await held.close()
    assert await _locks_held(pg_engine) == 0
    async with pg_engine.connect() as conn:
        assert [e.idempotency_key for e in await read_events(conn)] == ["kept"]


async def test_a_fold_failing_on_a_held_transaction_keeps_the_append_and_the_lock(
    pg_engine: AsyncEngine,
) -> None:
    """The appender's savepoint is opened with BEGIN and the lock (one round trip): a fold that
    fails is rolled back to it, the append is written again, and the lock stays held to the
    COMMIT (a lock taken after the savepoint would have gone with the rollback)."""
    from sqlalchemy.util import await_only

    from ledger.append import append_and_fold

    held = HeldConnection(pg_engine)
    seen: list[int] = []

    class Failing:
        def fold_appended(self, conn: sa.Connection, before: int, appended: list[Any]) -> bool:
            fetch_all(conn, sa.text("SELECT 1 / 0"))  # the transaction is aborted here
            return True

        def folded(self, appended: list[Any]) -> None:
            raise AssertionError("never folded")

    def work(conn: sa.Connection) -> tuple[Any, bool]:
        appended, folded = append_and_fold(conn, [make_delivery("kept")], Failing())
        seen.append(await_only(_locks_held(pg_engine)))
        return appended.results, folded

    try:
        (outcome,), folded = await held.run(work)
    finally:
        await held.close()
    assert folded is False and seen == [1]
    async with pg_engine.connect() as conn:
        assert [e.id for e in await read_events(conn)] == [outcome.event_id]


@pytest.mark.parametrize("planned_as_new", [False, True])
async def test_a_race_on_the_idempotency_index_is_absorbed_as_a_duplicate(
    pg_engine: AsyncEngine, caplog: pytest.LogCaptureFixture, planned_as_new: bool
) -> None:
    """Only the idempotency constraint is absorbed (SPEC): a webhook.received for the same key,
    committed by a writer that did not take the append lock between this append's lookup and
    its insert, makes this delivery a duplicate of it, not a 500. The append's rows go with the
    inline fold's first statement (deferred writes), so that statement raises the violation:
    it is the append's, and no fold is blamed for it. After a batch of new deliveries the next
    is planned as new without a lookup (ledger/append.py): the violation sends it back to its
    savepoint and it is planned again on what the log holds, in the same transaction."""
    import hashlib
    import uuid
    from datetime import UTC, datetime

    import orjson

    from ledger.appender import Appender
    from ledger.schema import events
    from projections.registry import PROJECTIONS
    from projections.runner import ProjectionRunner

    runner = ProjectionRunner(pg_engine, list(PROJECTIONS.values()))
    async with store.write_transaction(pg_engine) as conn:  # a key the appender will not know
        await append_commands(conn, [make_delivery("before")])
    async with Appender(pg_engine).running() as appender, _connected(pg_engine) as other:
        appender.folder = runner
        await appender.submit(make_delivery("first"))
        await runner.catch_up()  # the checkpoints stand at the head: appends fold inline
        if not planned_as_new:
            await appender.submit(make_delivery("before"))  # its original read: the next looks up
        execution = str(uuid.uuid4())
        racer = {
            "seq": 10**12,
            "id": str(uuid.uuid4()),
            "stream": f"execution-{execution}",
            "version": 1,
            "type": "webhook.received",
            "trigger_id": "t",
            "idempotency_key": "race",
            "data": orjson.dumps(
                {"execution_id": execution, "body_sha256": hashlib.sha256(b"{}").hexdigest()}
            ).decode(),
            "meta": "{}",
            "recorded_at": datetime.now(UTC),
            "hash": "0" * 64,
        }
        await other.begin()
        await other.execute(events.insert().values(racer))  # not committed yet
        answer = asyncio.create_task(appender.submit(make_delivery("race")))
        async with asyncio.timeout(10):  # the append waits on the racer's index entry
            while not await _waiting_for_a_lock(pg_engine):  # noqa: ASYNC110 - another session's state
                await asyncio.sleep(0.01)
        await other.commit()
        outcome = await asyncio.wait_for(answer, 10)
    assert outcome.is_duplicate and outcome.original_event_id == racer["id"]
    # Planned as new, the batch is planned again in its transaction; else the appender isolates
    # the command whose key raced and appends it again.
    assert ("evt=idempotency_race_absorbed" in caplog.text) is not planned_as_new
    assert "evt=inline_fold_failed" not in caplog.text
    async with pg_engine.connect() as conn:
        received = [e for e in await read_events(conn, limit=10) if e.idempotency_key == "race"]
    assert [e.type for e in received] == ["webhook.received", "webhook.duplicate"]


async def _waiting_for_a_lock(engine: AsyncEngine) -> list[tuple[str, str]]:
    """What each session waiting for a lock on `engine`'s database waits for, and its statement
    (the server is shared: other databases' sessions are not counted)."""
    async with engine.connect() as conn:
        query = (
            "SELECT wait_event, query FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        return [(str(w), str(q)) for w, q in (await conn.execute(sa.text(query))).all()]


_TAKE_APPEND_LOCK = sa.text("SELECT pg_advisory_xact_lock(:k)")


@contextlib.asynccontextmanager
async def _connected(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """Another session on `engine`'s database."""
    conn = await engine.connect()
    try:
        yield conn
    finally:
        await conn.close()


async def _keys(engine: AsyncEngine) -> list[str | None]:
    async with engine.connect() as conn:
        return [e.idempotency_key for e in await read_events(conn, limit=1000)]


async def test_a_commit_with_a_batch_waiting_begins_the_next_transaction_and_release_ends_it(
    pg_engine: AsyncEngine,
) -> None:
    """With the next batch waiting, the COMMIT and the next BEGIN (with the lock and savepoint)
    are one round trip: the batch is committed when `run` returns, and the lock stays held by the
    transaction begun for the next run, until that run commits or `release` ends it."""
    held = HeldConnection(pg_engine)
    try:
        await held.run(_append_one("first"), then=lambda: True)
        assert await _keys(pg_engine) == ["first"]  # committed: another session reads it
        assert await _locks_held(pg_engine) == 1  # the next transaction's
        await held.run(_append_one("second"), then=lambda: True)  # in the transaction begun
        assert await _keys(pg_engine) == ["first", "second"]
        await held.release()
        assert await _locks_held(pg_engine) == 0
        await held.release()  # nothing begun: nothing to do
        await held.run(_append_one("third"))  # its own BEGIN again; no batch waits: no chain
        assert await _locks_held(pg_engine) == 0
    finally:
        await held.close()
    assert await _keys(pg_engine) == ["first", "second", "third"]


async def test_a_chained_begin_never_holds_a_batch_behind_another_appender(
    pg_engine: AsyncEngine,
) -> None:
    """Another appender (the CLI, another host) queued for the lock gets it at our COMMIT; the
    lock asked for in the same round trip gives up after 1 ms instead of waiting for that
    appender's transaction (this batch's answers wait for the round trip), and the next run
    waits its turn with its own BEGIN."""
    held = HeldConnection(pg_engine)
    other = await pg_engine.connect()
    other_committed: list[float] = []

    async def other_appender() -> None:
        await other.execute(_TAKE_APPEND_LOCK, {"k": store.APPEND_LOCK_ID})
        await asyncio.sleep(2.0)
        await other.commit()
        other_committed.append(asyncio.get_running_loop().time())

    try:
        await held.run(_append_one("first"), then=lambda: True)  # the lock held from here
        waiting = asyncio.create_task(other_appender())
        async with asyncio.timeout(10):
            while not await _waiting_for_a_lock(pg_engine):  # noqa: ASYNC110 - another session's state
                await asyncio.sleep(0.01)
        started = asyncio.get_running_loop().time()
        await held.run(_append_one("second"), then=lambda: True)
        assert asyncio.get_running_loop().time() - started < 1.0  # not the other's 2 s
        assert await _keys(pg_engine) == ["first", "second"]
        await held.run(_append_one("third"))  # waits for the other's commit
        assert other_committed and asyncio.get_running_loop().time() >= other_committed[0]
        await waiting
    finally:
        await other.close()
        await held.close()
    assert await _keys(pg_engine) == ["first", "second", "third"]
    assert await _locks_held(pg_engine) == 0


async def test_a_chained_commit_of_an_aborted_transaction_fails_and_keeps_nothing(
    pg_engine: AsyncEngine,
) -> None:
    held = HeldConnection(pg_engine)
    try:
        with pytest.raises(sa.exc.OperationalError, match="aborted"):
            await held.run(_swallows_an_error("lost"), then=lambda: True)
        assert await _locks_held(pg_engine) == 0  # its connection went, and the lock with it
        await held.run(_append_one("kept"), then=lambda: True)
        with pytest.raises(sa.exc.DBAPIError):  # the begun transaction's connection was ended
            async with pg_engine.connect() as killer:
                await killer.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_locks"
                        " WHERE locktype = 'advisory' AND objid = :k AND database ="
                        " (SELECT oid FROM pg_database WHERE datname = current_database())"
                    ),
                    {"k": store.APPEND_LOCK_ID},
                )
            await held.run(_append_one("refused"))  # on the connection that was ended
        await held.run(_append_one("after"))  # a new connection
    finally:
        await held.close()
    assert await _keys(pg_engine) == ["kept", "after"]
    assert await _locks_held(pg_engine) == 0


async def test_the_appender_lets_the_lock_go_once_its_queue_runs_dry(
    pg_engine: AsyncEngine,
) -> None:
    """Batches that follow each other chain their transactions. One begun for a batch whose
    commands then went (their callers stopped waiting) is rolled back when the queue runs dry:
    an idle appender never holds the append lock."""
    from ledger.appender import Appender

    async with (
        Appender(pg_engine, max_batch=8).running() as appender,
        _connected(pg_engine) as other,
    ):
        outcomes = await asyncio.gather(
            *(appender.submit(make_delivery(f"k{n}")) for n in range(100))
        )
        # A batch waits for the lock another session holds; a command queued behind it is
        # given up by its caller before that batch commits: the commit begins a transaction
        # for a batch that is not there.
        await other.execute(_TAKE_APPEND_LOCK, {"k": store.APPEND_LOCK_ID})
        first = appender.enqueue(make_delivery("waits"))
        async with asyncio.timeout(10):
            while not await _waiting_for_a_lock(pg_engine):  # noqa: ASYNC110 - another session's state
                await asyncio.sleep(0.01)
        appender.enqueue(make_delivery("given up")).cancel()
        await other.commit()
        await asyncio.wait_for(first, 10)
        async with asyncio.timeout(5):
            while await _locks_held(pg_engine):  # noqa: ASYNC110 - another session's state
                await asyncio.sleep(0.01)
        await appender.submit(make_delivery("later"))  # the appender goes on after
    assert await _locks_held(pg_engine) == 0
    assert len({o.event_id for o in outcomes}) == 100
    assert sorted(k for k in await _keys(pg_engine) if k) == sorted(
        [*(f"k{n}" for n in range(100)), "waits", "later"]
    )
