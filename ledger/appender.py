"""Group commit: one writer task takes every queued command, appends them in one transaction
(ledger.append: one lock, one fsync), then answers each caller. Concurrent requests share the
cost of a commit.

A caller's future resolves only after COMMIT: an acknowledged delivery is durable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.append import Appended, Folder, FoldFailed, append_and_fold, goes_alone_next
from ledger.commands import AppendEvents, Command
from ledger.errors import StorageUnavailable
from ledger.events import NewEvent
from ledger.held import HeldConnection
from ledger.schema import IDEMPOTENCY_INDEX
from ledger.store import has_own_file, write_transaction
from ledger.writers import SqliteWriter

logger = logging.getLogger(__name__)

MAX_BATCH = 1000


@dataclass(slots=True)
class _Pending:
    """A queued command and who hears its result: a future, or a function called at once."""

    command: Command
    future: asyncio.Future[Any] | None = None
    answer: Callable[[Any], None] | None = None
    # An answered command's: its caller (a worker) stops waiting then, as `Overdue` does here.
    deadline: float | None = None

    @property
    def waiting(self) -> bool:
        """False once nobody waits for it (its caller cancelled the future, or gave up)."""
        if self.future is not None:
            return not self.future.done()
        return self.deadline is None or time.monotonic() < self.deadline

    def resolve(self, result: Any) -> None:
        """Hand over `result` (an exception for an error)."""
        if self.answer is not None:
            try:
                self.answer(result)
            except Exception:  # an answer must never stop the one writer
                logger.exception("evt=append_answer_failed")
            return
        future = self.future
        if future is None or future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def is_idempotency_violation(exc: sa.exc.IntegrityError) -> bool:
    text = str(exc.orig)
    return IDEMPOTENCY_INDEX in text or "events.trigger_id, events.idempotency_key" in text


def is_unavailable(exc: BaseException) -> bool:
    """Errors that mean 'the database cannot take writes now', as opposed to a bug or bad data."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | OSError | TimeoutError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("disk is full", "no space left", "database is locked"))


class Overdue:
    """Fails the waits for commits that take longer than `limit_s` with StorageUnavailable (a
    503 + Retry-After to a sender): a database that hangs (a network path dropping packets, a
    lock another process holds) must not hold its callers until they give up. One timer for
    all of them, not one a command (an asyncio.timeout a request cost a worker ~3 us of its ~33).

    A command whose wait failed before its batch began is never appended (`_Pending.waiting`);
    one being committed may still be, and its sender's retry is then its duplicate: never an
    acknowledgement of what was not stored."""

    def __init__(self, limit_s: float) -> None:
        self._limit = limit_s
        self._waiting: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, future: asyncio.Future[Any]) -> None:
        waiting = self._waiting
        while waiting and waiting[0][1].done():  # most are answered in the order they came
            waiting.popleft()
        loop = future.get_loop()
        waiting.append((loop.time() + self._limit, future))  # deadlines in order: one limit
        if self._timer is None:
            self._timer = loop.call_at(waiting[0][0], self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        waiting, now = self._waiting, loop.time()
        while waiting and (waiting[0][1].done() or waiting[0][0] <= now):
            _, future = waiting.popleft()
            if not future.done():
                late = TimeoutError(f"not committed within {self._limit:g} s")
                future.set_exception(StorageUnavailable(late))
        if waiting:
            self._timer = loop.call_at(waiting[0][0], self._expire, loop)


class Appender:
    """The one writer of this process. `submit` queues a command and waits for its commit
    (at most `wait_s`, when given: `Overdue`)."""

    def __init__(
        self, engine: AsyncEngine, *, max_batch: int = MAX_BATCH, wait_s: float | None = None
    ) -> None:
        self._engine = engine
        self._wait_s = wait_s or None
        self._overdue = Overdue(wait_s) if wait_s else None
        # Set by the projection runner: the projections are folded in the append's own
        # transaction, so they are never behind an acknowledged delivery (see projections.runner).
        self.folder: Folder | None = None
        # SQLite file: one plain connection, BEGIN and COMMIT off the loop (see SqliteWriter).
        self._writes_plain = has_own_file(engine)
        self._writer: SqliteWriter | None = None
        # PostgreSQL: one connection kept for the appender's transactions (see HeldConnection);
        # one not done within the wait's limit is closed: its callers were answered, and the
        # next batch must not queue behind a connection that went silent.
        self._held = (
            HeldConnection(engine, limit_s=wait_s or None)
            if engine.dialect.name == "postgresql"
            else None
        )
        # What waits for the next batch; `_arrived` wakes the writer when it waits for work.
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._max_batch = max_batch
        # Set after each commit that left the projections behind the log (none folded it in).
        self.committed = asyncio.Event()
        # Called after each commit with (batch size, seconds of the transaction): metrics, feeds.
        self.commit_listeners: list[Callable[[int, float], None]] = []
        self._started = 0.0
        self._behind = False

    def enqueue(self, command: Command) -> asyncio.Future[Any]:
        """Queue `command`; the future is its result once committed (or the error)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._put(_Pending(command, future))
        if self._overdue is not None:
            self._overdue.watch(future)
        return future

    def enqueue_answered(self, command: Command, answer: Callable[[Any], None]) -> None:
        """Queue `command`; `answer` is called with its result (an exception for an error) once
        committed, at once, inside the appender's own step: a caller answering over a socket
        (the ledger link) writes its answer before the loop turns to anything else, instead of
        a future's callback one loop iteration later, after whatever input came meanwhile.

        Its caller waits as long as `submit`'s (a worker's RemoteAppender has the same limit,
        started earlier): one still queued then is never appended, as a future's is not, for
        the caller answered 503 and the sender's retry is the command."""
        wait_s = self._wait_s
        deadline = None if wait_s is None else time.monotonic() + wait_s
        self._put(_Pending(command, answer=answer, deadline=deadline))

    def _put(self, pending: _Pending) -> None:
        self._queue.append(pending)  # unbounded: never waits
        self._arrived.set()

    async def submit(self, command: Command) -> Any:
        return await self.enqueue(command)

    async def append(self, events_: list[NewEvent], *, expected_version: int | None = None) -> Any:
        return await self.submit(AppendEvents(events=events_, expected_version=expected_version))

    async def run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                if self._held is not None:
                    await self._release_held()
                    if queue:  # arrived meanwhile
                        continue
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), self._max_batch))]
            await self._commit_batch(batch)

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if p.waiting]
        if len(live) < len(batch):
            self._give_up(batch, live)
        if not live:
            return
        try:
            results = await self._transaction([p.command for p in live])
        except sa.exc.IntegrityError as exc:
            await self._isolate(live, exc)
            return
        except Exception as exc:  # noqa: BLE001 - every caller must be answered, whatever failed
            self._fail_all(live, exc)
            return
        for pending, result in zip(live, results, strict=True):
            pending.resolve(result)
        self._notify(results)

    async def _transaction(self, commands: list[Command]) -> list[Any]:
        self._started = time.perf_counter()
        folder = self.folder
        try:
            appended, folded = await self._append(commands, folder)
        except FoldFailed:
            # Rolled back whole (SQLite's writer opens no savepoint): the same commands again,
            # planned afresh, without the fold; the runner folds them later and says why not.
            logger.exception("evt=inline_fold_failed")
            appended, folded = await self._append(commands, None)
        if appended.events and folded and folder is not None:
            folder.folded(appended.events)
        self._behind = self._behind or not folded
        return appended.results

    async def _append(
        self, commands: list[Command], folder: Folder | None
    ) -> tuple[Appended, bool]:
        if self._writes_plain:
            if self._writer is None:
                self._writer = SqliteWriter(self._engine)
            work = functools.partial(append_and_fold, commands=commands, folder=folder, redone=True)
            return await self._writer.run(work)
        work = functools.partial(append_and_fold, commands=commands, folder=folder)
        if self._held is not None:
            return await self._held.run(work, then=lambda: bool(self._queue), late=goes_alone_next)
        async with write_transaction(self._engine) as conn:
            return await conn.run_sync(work)

    async def _release_held(self) -> None:
        """End the transaction the last commit began for a batch that is not there (its
        commands' deadlines passed, or none came): it holds the append lock."""
        assert self._held is not None
        try:
            await self._held.release()
        except Exception as exc:  # noqa: BLE001 - gone with its connection; the next connects
            logger.warning("evt=append_release_failed cause=%r", exc)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Appender]:
        """This appender with `run` as a task, cancelled and the appender closed on leaving
        (the CLI's, the tests' and the bench's; the server runs it among its own tasks)."""
        task = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.close()

    async def close(self) -> None:
        """Let the writer's thread and connection go (after `run` was cancelled)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._held is not None:
            await self._held.close()

    async def _isolate(self, batch: list[_Pending], exc: sa.exc.IntegrityError) -> None:
        """One bad command must not fail its neighbours: retry each alone."""
        if len(batch) == 1:
            if is_idempotency_violation(exc):
                # Another appender got in without our lock (should not happen): re-plan once,
                # and the re-read sees the original, so this becomes a duplicate.
                logger.warning("evt=idempotency_race_absorbed cause=%s", exc.orig)
                try:
                    results = await self._transaction([batch[0].command])
                except Exception as again:  # noqa: BLE001
                    self._fail_all(batch, again)
                    return
                batch[0].resolve(results[0])
                self._notify(results)
                return
            logger.error("evt=append_integrity_error cause=%s", exc.orig)
            self._fail_all(batch, exc)
            return
        for pending in batch:
            await self._commit_batch([pending])

    def _give_up(self, batch: list[_Pending], live: list[_Pending]) -> None:
        # Answered commands left out for their deadline still owe an answer (a worker's link
        # keeps each call until answered); their caller has said 503 already.
        kept = {id(p) for p in live}
        gone = [p for p in batch if p.answer is not None and id(p) not in kept]
        if not gone:  # futures their callers cancelled (with no wait's limit, all are such)
            return
        late = StorageUnavailable(TimeoutError(f"not committed within {self._wait_s or 0:g} s"))
        for pending in gone:
            pending.resolve(late)

    def _fail_all(self, batch: list[_Pending], exc: BaseException) -> None:
        error: BaseException = StorageUnavailable(exc) if is_unavailable(exc) else exc
        if isinstance(error, StorageUnavailable):
            logger.warning("evt=storage_unavailable cause=%r", exc)
        for pending in batch:
            pending.resolve(error)

    def _notify(self, results: list[Any]) -> None:
        if self._behind:
            self._behind = False
            self.committed.set()
        seconds = time.perf_counter() - self._started
        for listener in self.commit_listeners:
            try:
                listener(len(results), seconds)
            except Exception:  # a listener must never stop the one writer
                logger.exception("evt=commit_listener_failed")
