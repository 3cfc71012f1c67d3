"""The appender's write transactions on a SQLite file: statements on the event loop's thread
through the stdlib's `sqlite3` (`SqliteWriter`), its WAL copied into the database by a thread of
its own (`WalCheckpointer`), never in its COMMITs. PostgreSQL's are in ledger/held.py
(`HeldConnection`). Each runs `work(conn)` in one write transaction and commits it; after any
failure its connection is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.known import knows_its_log, learned_at_commit
from ledger.rows import execute_sql
from ledger.schema import SQLITE_RECURSIVE_TRIGGERS
from ledger.store import (
    BUSY_TIMEOUT_MS,
    plain_sqlite_engine,
    process_write_lock,
    write_options,
)

T = TypeVar("T")

logger = logging.getLogger(__name__)

# SqliteWriter commits on the loop while its commits take less than this (a moving average).
# From a thread, the loop gets the commit's end only once that thread has the GIL back, which
# the loop's thread, busy with requests, hands over every switch interval (5 ms): a commit that
# syncs faster costs the loop less than the hop (measured with workers: +25-40 % requests/s).
# A slower disk gets the thread, so the loop does not stall on it.
LOOP_COMMIT_S = 0.005


# Every statement of the writer's plain connection goes through `execute_sql`: the driver's
# errors raised as SQLAlchemy raises them, so `is_unavailable` judges them as any other's.
def _busy_timeout(conn: sa.Connection, ms: int) -> None:
    execute_sql(conn, f"PRAGMA busy_timeout={ms:d}")


def _begin_immediate(conn: sa.Connection) -> None:
    execute_sql(conn, "BEGIN IMMEDIATE")  # its error raised as SQLAlchemy raises the driver's


def _restart_wal(driver: sqlite3.Connection) -> bool:
    """A RESTART checkpoint, which waits for no lock (the connection's busy timeout is 0): True
    when the WAL starts over (the next commit writes it from its start), False when a
    transaction or an old reader was in the way."""
    busy, _, _ = driver.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    return not busy


def _commit_now(conn: sa.Connection) -> None:
    # Not the driver's commit(), whose error is the driver's own: a COMMIT that fails (a disk
    # I/O error, a full disk) is an OperationalError as from any statement, a 503 and not a 500.
    execute_sql(conn, "COMMIT")


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


# The WAL is copied into the database by a thread of its own (`WalCheckpointer`), not inside the
# COMMIT of the batch that crosses SQLite's 1,000 pages: that COMMIT copied ~4 MiB into the
# database file and synced it, on the loop, about ten times a second under load, and on a disk
# whose syncs now and then stall for 40-300 ms, that batch and every one queued behind it
# waited as long (bench/README, session 12). Every 20 ms, not 50: the smaller copies and syncs
# of the database file get in the way of the WAL's sync less (session 17: p99 -8 %, the batches
# over 10 ms from 1-4 to 0-1 in a probe; at 10 ms the thread's own CPU began to cost).
CHECKPOINT_EVERY_S = 0.02
# A PASSIVE checkpoint waits for nothing, and so never lets the WAL start over while appends
# keep coming (a writer starts it over only when its transaction begins with every frame
# copied): past this many frames a RESTART is asked for, which waits for no lock either (when
# a transaction is under way it is tried again at the next tick).
RESTART_FRAMES = 8192  # 32 MiB of 4 KiB pages: under full load, one restart in ~0.6 s
# Past this many, a reader holds the WAL (a long export): said once, until it starts over.
GROWING_FRAMES = 16 * RESTART_FRAMES


class WalCheckpointer:
    """Copies the WAL of one SQLite file into the database from a thread of its own, every
    `CHECKPOINT_EVERY_S`, with synchronous=FULL (the database file is synced before any frame
    is overwritten), while the appender's connection never checkpoints
    (`wal_autocheckpoint=0`). The thread's SQLite calls let go of the GIL: the loop goes on.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._stop = threading.Event()
        self.commits = 0  # counted by the writer: a tick after none has nothing to copy
        self.checkpoints = 0
        self.restarts = 0
        self.largest = 0  # the most frames the WAL held at a checkpoint
        self.owed = False  # a restart failed (a transaction or a reader was in the way)
        self.gap_wanted = False  # ... and the writer may try it once, between its transactions
        self._thread = threading.Thread(target=self._run, name="hookledger-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=0")
            conn.execute(SQLITE_RECURSIVE_TRIGGERS)  # it writes no rows; every connection says it
        except sqlite3.Error:
            # Not a database the writer could use either: its own errors will say so.
            logger.exception("evt=wal_checkpointer_failed")
            return
        try:
            growing, failing, seen = False, False, 0
            while not self._stop.wait(CHECKPOINT_EVERY_S):
                if self.commits == seen and not self.owed and not failing:
                    continue  # nothing new, and no restart owed
                seen = self.commits
                try:
                    frames = self.step(conn)
                except sqlite3.Error as exc:  # a full disk, an I/O error: tried again
                    if not failing:  # said once, not at every tick
                        logger.warning("evt=wal_checkpoint_failed cause=%r", exc)
                    failing = True
                    continue
                if failing:
                    logger.info("evt=wal_checkpoint_recovered")
                failing = False
                if frames >= GROWING_FRAMES and not growing:
                    logger.warning("evt=wal_growing frames=%d", frames)
                growing = frames >= GROWING_FRAMES
        finally:
            conn.close()

    def step(self, conn: sqlite3.Connection) -> int:
        """One checkpoint (and a restart when the WAL is long); the frames it held."""
        _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        self.largest = max(self.largest, frames)
        self.owed = frames >= RESTART_FRAMES
        if self.owed:
            restarted = _restart_wal(conn)
            self.owed = not restarted  # a transaction was under way: the next tick tries again
            self.restarts += restarted
            self.gap_wanted = self.owed  # and the writer, before its next transaction
        return int(frames)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class SqliteWriter:
    """The write transactions of one SQLite database in this process, on one plain connection.

    Through the asyncio driver every statement is a round trip to the driver's thread (~24 per
    append batch with the projections folded in), and each hop hands the GIL back and forth.
    Here the statements of a transaction run on the event loop's own thread, as plain sqlite3
    calls (microseconds each: SQLite is in-process); what may wait goes to a thread while the
    loop serves other requests: BEGIN IMMEDIATE when another process holds the write lock
    (`_begin`), and COMMIT when the disk is slow to sync (`_commit`). The process's write lock
    is held from BEGIN to the end of COMMIT, so the async engine's writers (the runner,
    rebuilds) queue behind it as before.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._async_engine = engine
        self._engine = plain_sqlite_engine(engine)
        self._conn: sa.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="hookledger-commit")
        self._commit_s = 0.0  # how long a commit takes (a moving average)
        database = self._engine.url.database
        assert database, "a SQLite file"  # the appender writes plainly only to a file
        self.checkpointer = WalCheckpointer(database)

    async def run(self, work: Callable[[sa.Connection], T]) -> T:
        """`work(conn)` in one write transaction (BEGIN IMMEDIATE … COMMIT): committed on return."""
        async with process_write_lock(self._async_engine):
            try:
                if self.checkpointer.gap_wanted:
                    await self._restart_in_gap()
                conn = await self._begin()
                result = work(conn)
                await self._commit(conn)
            except BaseException:
                self._discard()
                raise
            learned_at_commit(conn)
            return result

    async def _begin(self) -> sa.Connection:
        # BEGIN IMMEDIATE on the loop, on a connection whose busy timeout is 0: it takes the
        # write lock at once, or fails at once when another process's writer holds it (this
        # process's writers queue on the asyncio lock). Only then does it wait, in the thread
        # (SQLite's busy handler), on a fresh connection: the loop never waits for a lock.
        # Sent to the driver, as COMMIT is: SQLAlchemy's transaction around them (its begin
        # event, which sends the same BEGIN through a whole execution, and its bookkeeping) was
        # ~0.1 ms a batch; `work` runs its statements on the driver's cursor anyway.
        conn = self._connection()
        try:
            _begin_immediate(conn)
            return conn
        except sa.exc.OperationalError as exc:
            if "locked" not in str(exc.orig) and "busy" not in str(exc.orig):
                raise
        self._discard()
        conn = self._connection()
        _busy_timeout(conn, BUSY_TIMEOUT_MS)
        await self._in_thread(functools.partial(_begin_immediate, conn))
        _busy_timeout(conn, 0)
        return conn

    async def _commit(self, conn: sa.Connection) -> None:
        # The COMMIT and its fsync: on the loop while they are fast (LOOP_COMMIT_S), else in the
        # thread, where the driver lets go of the GIL throughout. Either way it is timed, so a
        # disk that becomes slow (or fast again) moves it.
        commit = functools.partial(_commit_now, conn)
        if self._commit_s < LOOP_COMMIT_S:
            took = _timed(commit)
        else:
            took = await self._in_thread(functools.partial(_timed, commit))
        self._commit_s += (took - self._commit_s) / 8
        self.checkpointer.commits += 1

    async def _restart_in_gap(self) -> None:
        """The checkpointer's RESTART found a transaction of ours in the way, as it may at every
        tick under steady appends when its copy takes longer than the gaps between them (a slow
        disk, a loaded machine: the WAL then grew with the log until the load stopped). Here,
        holding the write lock between two transactions, the writer's own connection asks for
        it once, in the writer's thread: only another process's writer or an old reader can be
        in the way now, and then the checkpointer tries again at its next tick."""
        checkpointer = self.checkpointer
        checkpointer.gap_wanted = False
        driver = self._connection().connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        try:
            restarted = await self._in_thread(functools.partial(_restart_wal, driver))
        except sqlite3.Error:
            return  # a failing disk: the checkpointer's next tick says so; the append goes on
        if restarted:
            checkpointer.owed = False
            checkpointer.restarts += 1

    async def _in_thread(self, call: Callable[[], T]) -> T:
        running = asyncio.get_running_loop().run_in_executor(self._thread, call)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            await asyncio.wait([running])  # keep the write lock until the call has ended
            raise

    def _connection(self) -> sa.Connection:
        if self._conn is None:
            self._conn = write_options(self._engine.connect())
            _busy_timeout(self._conn, 0)  # see _begin
            # A statement that may fail halfway keeps the pages it changes in a sub-journal (the
            # appender's savepoint did too, before it was dropped here: `append_and_fold`,
            # `redone`). In a file (the default), that was a temporary file created, written
            # and unlinked in most append transactions; in memory it is a few pages, bounded by
            # one batch.
            # Only this connection: elsewhere a large sort may still spill to disk.
            execute_sql(self._conn, "PRAGMA temp_store=MEMORY")
            # Its COMMITs never copy the WAL into the database: the checkpointer's thread does.
            execute_sql(self._conn, "PRAGMA wal_autocheckpoint=0")
            # What it appended, so that a duplicate of a recent key reads nothing (ledger.known).
            knows_its_log(self._conn)
        return self._conn

    def _discard(self) -> None:
        # After any failure (or a cancellation) start afresh: closing the connection rolls back
        # whatever it still holds, and the next transaction opens a new one.
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        self.checkpointer.close()
        self._thread.shutdown(wait=True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._engine.dispose()
