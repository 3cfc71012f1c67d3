"""PostgreSQL: a batch planned without a read goes as one statement, its own transaction
(ledger/append.py `_append_alone`): the append lock taken before anything is written, the events,
the fold's rows and the checkpoints' move in one round trip, and nothing of it written when any
of it fails, the batch then appended in a transaction as before. The real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from factories import delivery as make_delivery
from sqlalchemy.ext.asyncio import AsyncEngine
from test_rebuild_concurrency import assert_live_equals_a_fresh_rebuild
from test_writers import _keys, _locks_held, _waiting_for_a_lock

from ledger import append as append_module
from ledger import store
from ledger.append import Folder, append_and_fold, append_batch, goes_alone_next
from ledger.chain import verify_chain
from ledger.commands import Command
from ledger.events import RecordedEvent
from ledger.held import HeldConnection
from ledger.rows import fetch_all
from ledger.schema import EXPECTED_ROWS_STATE
from projections.registry import PROJECTIONS
from projections.runner import PROJECTOR_LOCK_ID, ProjectionRunner

# Every prepared statement this session ran (the appender's go as such), but this count's own.
_EXECUTED = sa.text(
    "SELECT coalesce(sum(generic_plans + custom_plans), 0) FROM pg_prepared_statements"
    " WHERE statement NOT LIKE '%pg_prepared_statements%'"
)


def _folded(folder: Folder | None, *commands: Command) -> Callable[[sa.Connection], Any]:
    """The appender's work for a batch: its results, and whether `folder` folded it inline."""

    def work(conn: sa.Connection) -> tuple[list[Any], bool]:
        appended, folded = append_and_fold(conn, commands, folder)
        return appended.results, folded

    return work


@contextlib.asynccontextmanager
async def _simple_queries(held: HeldConnection) -> AsyncIterator[list[str]]:
    """The simple queries (BEGIN, COMMIT) `held` sends within, in order."""
    driver = await held.run(lambda conn: conn.connection.driver_connection)
    simple: list[str] = []

    def logged(query: Any) -> None:
        simple.append(query.query)

    driver.add_query_logger(logged)
    try:
        yield simple
        await asyncio.sleep(0.05)  # the driver calls its loggers soon, not at once
    finally:
        driver.remove_query_logger(logged)


async def _sent(held: HeldConnection, work: Callable[[sa.Connection], Any]) -> tuple[Any, int, Any]:
    """`work` run as the appender runs a batch (its BEGIN left to it when it may go alone): its
    result, how many prepared statements it ran, and the simple queries it sent (BEGIN, COMMIT)
    in order."""
    before = await held.run(lambda conn: int(fetch_all(conn, _EXECUTED)[0][0]))
    async with _simple_queries(held) as simple:
        result = await held.run(work, late=goes_alone_next)
    after = await held.run(lambda conn: int(fetch_all(conn, _EXECUTED)[0][0]))
    return result, after - before, simple


def _transactions(simple: list[str]) -> list[str]:
    """The statements that begin or end a transaction among simple queries sent."""
    return [q.split(";")[0] for q in simple if q.startswith(("BEGIN", "COMMIT"))]


async def _started(runner: ProjectionRunner, held: HeldConnection) -> None:
    """Two batches, the first reading the log, the projections at the head and folded inline:
    the next batch may go alone."""
    await held.run(_folded(runner, make_delivery("first")))
    await runner.catch_up()
    await held.run(_folded(runner, make_delivery("second")))


async def test_a_batch_planned_without_a_read_is_one_statement_and_its_own_transaction(
    pg_engine: AsyncEngine,
) -> None:
    runner = ProjectionRunner(pg_engine, list(PROJECTIONS.values()))
    held = HeldConnection(pg_engine)
    try:
        await _started(runner, held)
        batch = [make_delivery("a"), make_delivery("b"), make_delivery("first")]
        (results, folded), prepared, simple = await _sent(held, _folded(runner, *batch))
        assert _transactions(simple) == []  # no BEGIN, no COMMIT
        assert folded
        assert await _locks_held(pg_engine) == 0  # its transaction ended
        assert await _keys(pg_engine) == ["first", "second", "a", "b", "first"]  # committed
        a, b, again = results
        assert not a.is_duplicate and not b.is_duplicate and again.is_duplicate
        # The driver's queries of its own (the types of a first statement) are behind it:
        (results, _), prepared, simple = await _sent(held, _folded(runner, make_delivery("a")))
        assert (prepared, simple) == (1, [])  # no BEGIN, no COMMIT: one round trip
        assert results[0].is_duplicate
    finally:
        await held.close()
    assert (await verify_chain(pg_engine)).ok
    assert set((await runner.lag()).values()) == {0}  # folded inline, all of it
    await assert_live_equals_a_fresh_rebuild(pg_engine)


async def test_the_statement_takes_the_append_lock_before_it_writes_or_locks_anything(
    pg_engine: AsyncEngine,
) -> None:
    """Another appender (the CLI, another host) holds the lock: the batch's statement waits for
    it having written and locked nothing, so that appender appends at the same seq and touches
    the checkpoints the statement moves without waiting. Once it commits, the statement fails
    on that seq, and the batch is planned on the log in a transaction, after its event."""
    runner = ProjectionRunner(pg_engine, list(PROJECTIONS.values()))
    held = HeldConnection(pg_engine)
    other = await pg_engine.connect()
    try:
        await _started(runner, held)
        async with _simple_queries(held) as simple:
            lock = sa.text("SELECT pg_advisory_xact_lock(:k)")
            await other.execute(lock, {"k": store.APPEND_LOCK_ID})
            work = _folded(runner, make_delivery("mine"))
            mine = asyncio.ensure_future(held.run(work, late=goes_alone_next))
            for _ in range(100):
                if waiting := await _waiting_for_a_lock(pg_engine):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the batch never waited for the append lock")
            ((what, statement),) = waiting
            assert what == "advisory" and statement.startswith("WITH _w0 AS (INSERT INTO events")
            await other.execute(sa.text("SET LOCAL lock_timeout = '500ms'"))
            await other.run_sync(append_batch, [make_delivery("theirs")])
            touch = sa.text("UPDATE projection_checkpoints SET updated_at = updated_at")
            await other.execute(touch)
            await other.commit()
            results, folded = await mine
        assert _transactions(simple) == ["BEGIN", "COMMIT"]  # then planned in a transaction
        assert not results[0].is_duplicate and not folded  # the checkpoints were behind theirs
    finally:
        await other.close()
        await held.close()
    assert await _keys(pg_engine) == ["first", "second", "theirs", "mine"]
    assert (await verify_chain(pg_engine)).ok
    await runner.catch_up()
    await assert_live_equals_a_fresh_rebuild(pg_engine)


async def test_checkpoints_another_runner_holds_fail_the_statement_and_the_batch_is_kept(
    pg_engine: AsyncEngine,
) -> None:
    """The inline fold's checkpoints cannot all move (another runner holds the projector
    lock): the statement fails whole, the batch is appended in a transaction, its fold left to
    the runner; and for a second after, batches go in transactions, then alone again."""
    runner = ProjectionRunner(pg_engine, list(PROJECTIONS.values()))
    held = HeldConnection(pg_engine)
    other = await pg_engine.connect()
    try:
        await _started(runner, held)
        await other.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": PROJECTOR_LOCK_ID})
        (results, folded), _, simple = await _sent(held, _folded(runner, make_delivery("x")))
        assert _transactions(simple) == ["BEGIN", "COMMIT"] and not folded
        assert not results[0].is_duplicate
        (results, folded), _, simple = await _sent(held, _folded(runner, make_delivery("x")))
        assert _transactions(simple) == [
            "BEGIN",
            "COMMIT",
        ]  # soon after a batch that could not go alone
        assert results[0].is_duplicate and not folded
        await other.commit()
        await runner.catch_up()
        await asyncio.sleep(append_module.PLAN_ON_LOG_AFTER_MISS_S)
        (results, folded), prepared, simple = await _sent(held, _folded(runner, make_delivery("z")))
        assert (prepared, simple) == (1, []) and folded
    finally:
        await other.close()
        await held.close()
    assert await _keys(pg_engine) == ["first", "second", "x", "x", "z"]
    assert (await verify_chain(pg_engine)).ok
    await assert_live_equals_a_fresh_rebuild(pg_engine)


class _ReadingFolder:
    """A folder whose fold reads the database: it cannot go in the append's one statement."""

    def __init__(self) -> None:
        self.tried: list[int] = []
        self.folds: list[int] = []

    def fold_appended(
        self, conn: sa.Connection, before: int, appended: list[RecordedEvent]
    ) -> bool:
        self.tried.append(len(appended))
        fetch_all(conn, sa.text("SELECT 1"))
        self.folds.append(len(appended))
        return True

    def folded(self, appended: list[RecordedEvent]) -> None:
        pass


async def test_a_fold_that_reads_sends_nothing_alone_and_the_batch_goes_in_a_transaction(
    pg_engine: AsyncEngine,
) -> None:
    folder = _ReadingFolder()
    held = HeldConnection(pg_engine)
    try:
        await held.run(_folded(folder, make_delivery("first")))
        await held.run(_folded(folder, make_delivery("second")))
        (results, folded), _, simple = await _sent(held, _folded(folder, make_delivery("c")))
        assert _transactions(simple) == ["BEGIN", "COMMIT"] and folded
        assert not results[0].is_duplicate
    finally:
        await held.close()
    assert await _keys(pg_engine) == ["first", "second", "c"]
    assert folder.tried == [1, 1, 1, 1]  # the third batch: tried alone, its read unsent
    assert folder.folds == [1, 1, 1]
    assert (await verify_chain(pg_engine)).ok


async def test_expect_rows_fails_its_statement_unless_the_rows_are_those_expected(
    pg_engine: AsyncEngine,
) -> None:
    async with pg_engine.connect() as conn:
        query = sa.text("SELECT hookledger_expect_rows(:actual, :expected, 'the rows')")
        assert (await conn.execute(query, {"actual": 2, "expected": 2})).scalar_one() == 2
        with pytest.raises(sa.exc.DBAPIError) as failed:
            await conn.execute(query, {"actual": 1, "expected": 2})
    assert getattr(failed.value.orig, "sqlstate", None) == EXPECTED_ROWS_STATE
    assert "hookledger: the rows: 1 rows where 2 were expected" in str(failed.value)
