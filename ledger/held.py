"""PostgreSQL's write transactions for the appender: one connection kept for them, whose
transactions it begins itself (`HeldConnection`). SQLite's are in ledger/writers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import await_only  # the async adapter's bridge, as in run_sync

from ledger.known import knows_its_log, learned_at_commit
from ledger.store import (
    APPEND_LOCK_ID,
    APPEND_SAVEPOINT,
    BEGIN_LATE,
    COMMITTED_ALONE,
    INDEX_PLANS,
    LOCKED_AT_BEGIN,
    SAVEPOINT_AT_BEGIN,
    unpooled_engine,
)

T = TypeVar("T")

# How long PostgreSQL lets an append transaction of ours sit idle (waiting for its next
# statement) before it ends it and frees the append lock. A batch's statements follow each other
# within milliseconds, even on a loaded loop; a process frozen (SIGSTOP, a paused VM) or cut off
# mid-batch would otherwise hold every other appender until it woke.
IDLE_IN_APPEND_S = 10.0

# The appender's session plans each of its statements once (a generic plan), not at each
# execution, and only as index probes joined by nested loops (`INDEX_PLANS`, ledger/store.py).
# PostgreSQL plans a prepared statement anew while its custom plans have cost less on average
# than its generic one, and the head-and-originals read never got past that: its first batches (a
# delivery each, at start-up or under light load) were cheap custom plans, and ~0.45 ms of the
# server's CPU went to planning it at every batch, more than running it.
APPEND_SESSION = {"plan_cache_mode": "force_generic_plan", **INDEX_PLANS}


class HeldConnection:
    """The write transactions of PostgreSQL on one connection this writer keeps.

    A connection from the pool costs two round trips a transaction (the pre-ping on checkout,
    the reset on return): on PostgreSQL an append batch is ~12 round trips, each resumed only
    when the loop gets to it, so those two were an eighth of a batch. And its transactions are
    begun here, not by the driver: `BEGIN; SELECT pg_advisory_xact_lock(…); SAVEPOINT append`
    goes as one simple query, one round trip where the driver's BEGIN, the lock and the
    appender's savepoint were three (the connection is in autocommit for the driver, so it sends
    no BEGIN of its own; `take_append_lock` and `append_and_fold` know both are in place).
    After any failure (the database went away, a cancellation) the connection is invalidated,
    which ends its transaction and lock on the server, and the next one is new.

    When the next batch is already waiting at a commit (`run(..., then=…)` says so: under load,
    nearly always), its transaction is begun in the COMMIT's own round trip: `SELECT 1; COMMIT;
    BEGIN; …` (a batch was five round trips, now four). The `SELECT 1` keeps the check that
    the COMMIT was one: in a transaction an error left aborted it fails, and the statements
    after it in the query are not run. The lock is asked for there with a `lock_timeout` of
    1 ms: this batch's answers wait for that query, and must not wait behind another appender
    (another host's, the CLI's) that was queued for the lock; when it was, the transaction just
    begun is rolled back and the next run begins as before, waiting its turn. A transaction
    begun and not yet used is ended by `release` (the appender's queue ran dry) or with its
    connection.

    Neither side waits for ever on the other. A transaction not done within `limit_s` (a
    network path that went silent: the kernel would wait ~15 minutes) has its connection closed
    here, failing it, and the next one connects again. And the server ends a transaction of ours
    that sits idle for `idle_limit_s` (a process frozen or gone mid-batch), with its lock, which
    would otherwise stop every appender of every host.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        limit_s: float | None = None,
        idle_limit_s: float = IDLE_IN_APPEND_S,
    ) -> None:
        self._engine = unpooled_engine(engine, APPEND_SESSION)  # see `run`
        self._conn: AsyncConnection | None = None
        self._limit_s = limit_s
        self._begin = _begin_locked(idle_limit_s)
        self._chained = _chained_begin(idle_limit_s)
        self._begun = False  # a transaction begun (with the lock and savepoint) for the next run

    async def run(
        self,
        work: Callable[[sa.Connection], T],
        *,
        then: Callable[[], bool] | None = None,
        late: Callable[[sa.Connection], bool] | None = None,
    ) -> T:
        """`work(conn)` in one write transaction holding the append lock, committed on return;
        when `then()` says at the commit that another run follows, its transaction is begun in
        the same round trip. When `late(conn)` says so before a transaction is begun, its BEGIN
        is left to `work` (ledger.store `BEGIN_LATE`: ledger.append's, which may make its batch
        one statement, its own transaction, and says so by `COMMITTED_ALONE`); and at a COMMIT,
        a next run that will be so is not begun."""
        if self._conn is None:
            # A new connection, never one of the pool's: after a failure (a path gone silent
            # above all), the pool's idle ones may be as dead as the one just closed.
            conn = await self._engine.connect()
            self._conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            knows_its_log(self._conn.sync_connection)  # type: ignore[arg-type]
        conn = self._conn
        timer = None
        if self._limit_s is not None:
            driver = conn.sync_connection.connection.driver_connection  # type: ignore[union-attr]
            assert driver is not None
            # Its pending statement fails, and the transaction with it.
            timer = asyncio.get_running_loop().call_later(self._limit_s, driver.terminate)
        begun, self._begun = self._begun, False
        try:
            result, self._begun = await conn.run_sync(
                _locked_transaction,
                None if begun else self._begin,
                work,
                self._chained,
                then,
                late,
            )
            return result
        except BaseException:
            await self._drop(conn)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def _drop(self, conn: AsyncConnection) -> None:
        """After a failure: the connection closed for real (the server rolls back and unlocks);
        the next run connects again."""
        self._conn = None
        with contextlib.suppress(Exception):
            await conn.invalidate()
        await _close_quietly(conn)

    async def release(self) -> None:
        """End a transaction begun for a run that did not come (its lock let go)."""
        if not self._begun or self._conn is None:
            return
        self._begun = False
        conn = self._conn
        driver = conn.sync_connection.connection.driver_connection  # type: ignore[union-attr]
        assert driver is not None
        try:
            await driver.execute("ROLLBACK")
        except BaseException:
            await self._drop(conn)
            raise

    async def close(self) -> None:
        self._begun = False
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close_quietly(conn)
        await self._engine.dispose()


def _begin_locked(idle_limit_s: float) -> str:
    """BEGIN, the idle limit for this transaction only (an export's may wait on its reader),
    the lock, then the append's savepoint (a lock taken inside a savepoint would go with a
    rollback to it): one simple query, one round trip."""
    return (
        f"BEGIN; SET LOCAL idle_in_transaction_session_timeout = {round(idle_limit_s * 1000):d};"
        f" SELECT pg_advisory_xact_lock({APPEND_LOCK_ID:d}); SAVEPOINT {APPEND_SAVEPOINT}"
    )


def _chained_begin(idle_limit_s: float) -> str:
    """`_begin_locked` after the COMMIT of the transaction before (see HeldConnection): the lock
    asked for with a 1 ms `lock_timeout` (55P03 when another appender is queued for it), then
    the session's own `lock_timeout` again, for the transaction's other statements."""
    return (
        f"SELECT 1; COMMIT; BEGIN;"
        f" SET LOCAL idle_in_transaction_session_timeout = {round(idle_limit_s * 1000):d};"
        f" SET LOCAL lock_timeout = 1; SELECT pg_advisory_xact_lock({APPEND_LOCK_ID:d});"
        f" SET LOCAL lock_timeout TO DEFAULT; SAVEPOINT {APPEND_SAVEPOINT}"
    )


_LOCK_NOT_AVAILABLE = "55P03"


def _locked_transaction(
    conn: sa.Connection,
    begin: str | None,
    work: Callable[[sa.Connection], T],
    chained: str,
    then: Callable[[], bool] | None,
    late: Callable[[sa.Connection], bool] | None,
) -> tuple[T, bool]:
    """`work(conn)` between our own BEGIN (with the append lock; None: begun already) and
    COMMIT, in the greenlet of `AsyncConnection.run_sync`: the driver's calls are awaited as the
    adapter awaits its own. With the result, whether the next transaction was begun with the
    COMMIT (`then()`; see HeldConnection). When `late(conn)` says so, the BEGIN is left to
    `work` (`BEGIN_LATE`), which may commit alone (`COMMITTED_ALONE`)."""
    driver = conn.connection.driver_connection  # asyncpg's connection
    assert driver is not None

    def run(sql: str) -> str:
        try:
            status: str = await_only(driver.execute(sql))
        except Exception as exc:
            # asyncpg's own error (the adapter translates only its cursor's): the database
            # cannot take this write now, as SQLAlchemy would say it (is_unavailable: a 503).
            raise sa.exc.OperationalError(sql, None, exc) from exc
        return status

    if begin is not None:
        if late is not None and late(conn):
            conn.info[BEGIN_LATE] = lambda _: run(begin)
        else:
            run(begin)
    conn.info[LOCKED_AT_BEGIN] = conn.info[SAVEPOINT_AT_BEGIN] = True
    try:
        result = work(conn)
    finally:
        if not conn.invalidated:  # else gone with its connection: asking would mask the error
            conn.info.pop(LOCKED_AT_BEGIN, None)
            conn.info.pop(SAVEPOINT_AT_BEGIN, None)
            conn.info.pop(BEGIN_LATE, None)
    if conn.info.pop(COMMITTED_ALONE, False):
        learned_at_commit(conn)  # its one statement was its transaction, committed
        return result, False
    # In a transaction an error left aborted, PostgreSQL answers COMMIT with a ROLLBACK, and no
    # error: nothing of it may be acknowledged then. Chained, the SELECT before it fails there.
    begun = False
    if then is not None and not (late is not None and late(conn)) and then():
        try:
            run(chained)
            begun = True
        except sa.exc.OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            # Only the chained lock can time out so: the COMMIT before it was one; the
            # transaction begun after it is aborted, and ends here.
            run("ROLLBACK")
    else:
        status = run("COMMIT")
        if status != "COMMIT":
            message = f"the commit was a {status}"
            raise sa.exc.OperationalError("COMMIT", None, RuntimeError(message))
    # What this transaction's append left (its head, for the next append to expect), learned
    # once it is committed; never that of a transaction that failed (its connection is dropped).
    learned_at_commit(conn)
    return result, begun


async def _close_quietly(conn: AsyncConnection) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):  # a database that went away must not hold a shutdown
            await conn.close()
