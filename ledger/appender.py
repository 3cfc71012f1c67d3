"""Group commit: one writer task takes every queued command, appends them in one transaction
(one lock, one fsync), then answers each caller. Concurrent requests share the cost of a commit.

A caller's future resolves only after COMMIT: an acknowledged delivery is durable.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import operator
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from ledger.codec import canonical_bytes, chain_hash, dumps, format_time
from ledger.commands import AppendEvents, Command, Original, PlanState, RecordDelivery, result_of
from ledger.errors import LedgerError, StorageUnavailable
from ledger.events import NewEvent, RecordedEvent, WebhookReceived, execution_of_stream
from ledger.rows import (
    array_of,
    defer_writes,
    discard,
    execute_sql,
    fetch_all,
    flush,
    insert_many,
    padded,
    stop_deferring,
)
from ledger.schema import IDEMPOTENCY_INDEX, events, json_text
from ledger.store import (
    APPEND_SAVEPOINT,
    SAVEPOINT_AT_BEGIN,
    has_own_file,
    head_of,
    read_head,
    read_head_statement,
    read_versions,
    take_append_lock,
    to_recorded,
    write_transaction,
)
from ledger.writers import HeldConnection, SqliteWriter

logger = logging.getLogger(__name__)

MAX_BATCH = 1000


@dataclass(slots=True)
class _Pending:
    """A queued command and who hears its result: a future, or a function called at once."""

    command: Command
    future: asyncio.Future[Any] | None = None
    answer: Callable[[Any], None] | None = None

    @property
    def waiting(self) -> bool:
        """False once nobody waits for it (its caller cancelled the future)."""
        return self.future is None or not self.future.done()

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


class likely(FunctionElement[bool]):  # noqa: N801 - reads as the SQL function it renders
    """`likely(x)` on SQLite (a hint that x is not selective), plain `x` elsewhere."""

    inherit_cache = True
    type = sa.Boolean()
    name = "likely"
    _is_implicitly_boolean = True  # a condition as it stands, not `likely(…) = 1`


@compiles(likely)
def likely_plain(element: likely, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(likely, "sqlite")
def likely_sqlite(element: likely, compiler: SQLCompiler, **kw: Any) -> str:
    return f"likely({compiler.process(element.clauses, **kw)})"


# SQLite allows at most 500 terms in a compound SELECT; a larger batch asks in several statements.
ORIGINALS_CHUNK = 256


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
        chunk = padded(ordered[start : start + ORIGINALS_CHUNK])
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
        .limit(1)
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
) -> tuple[tuple[int, str], dict[tuple[str, str], Original], dict[str, int]]:
    """The head of the log; the original of each key already received, and the version of its
    stream."""
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


def _plan_state(
    conn: sa.Connection, commands: Sequence[Command]
) -> tuple[tuple[int, str], PlanState]:
    """The head of the log, and what planning `commands` reads."""
    keys = {key for c in commands if isinstance(c, RecordDelivery) and (key := c.key)}
    head, originals, versions = _read_head_and_originals(conn, keys)
    streams = [s for c in commands if isinstance(c, AppendEvents) for s in c.streams]
    return head, PlanState(read_versions(conn, streams) | versions, originals)


def _rows(
    planned: list[tuple[NewEvent, int]], head: tuple[int, str], now: datetime
) -> list[dict[str, Any]]:
    seq, previous = head
    rows = []
    recorded_at = format_time(now)  # one per batch: strftime per row was a tenth of the append
    for event, version in planned:
        seq += 1
        data, meta = dumps(event.data), dumps(event.meta)
        row: dict[str, Any] = {
            "seq": seq,
            "id": event.id,
            "stream": event.stream,
            "version": version,
            "type": event.type,
            "trigger_id": event.trigger_id,
            "idempotency_key": event.idempotency_key,
            "data": data,
            "meta": meta,
        }
        canonical = canonical_bytes(
            seq=seq,
            id=event.id,
            stream=event.stream,
            version=version,
            type=event.type,
            trigger_id=event.trigger_id,
            idempotency_key=event.idempotency_key,
            data=data,
            meta=meta,
            recorded_at=recorded_at,
        )
        previous = chain_hash(previous, canonical)
        row["recorded_at"], row["hash"] = now, previous
        rows.append(row)
    return rows


@dataclass(slots=True)
class Appended:
    """What one append transaction did: each command's result, and the events it wrote."""

    results: list[Any]
    before: int  # the head's seq before this transaction
    events: list[RecordedEvent]
    rows: list[dict[str, Any]]  # the events' rows as inserted


async def append_commands(conn: AsyncConnection, commands: Sequence[Command]) -> list[Any]:
    """Append every command in the caller's transaction; each result is its outcome or its error.

    The caller's transaction must be a write transaction (see `write_transaction`).
    """
    return (await conn.run_sync(append_batch, commands)).results


def append_batch(conn: sa.Connection, commands: Sequence[Command]) -> Appended:
    """The append core (plain SQLAlchemy, so one thread can run a whole transaction): every
    command's result, and the events written, as a reader of the log sees them."""
    take_append_lock(conn)
    return _append_locked(conn, commands)


def append_and_fold(
    conn: sa.Connection, commands: Sequence[Command], folder: Folder | None
) -> tuple[Appended, bool]:
    """The appender's transaction: `append_batch`, then the new events folded into the
    projections by `folder` in the same transaction; True when they were (or there were none).

    A fold that fails must not cost the append: everything after the savepoint opened before
    the append is rolled back, and the append's rows are written again (the runner folds them
    later, and says why it cannot). The savepoint stands from the start, not between the append
    and the fold: on PostgreSQL the held connection opens it with BEGIN and the lock, so it
    costs no round trip of its own. On PostgreSQL the writes also wait for the statement after
    them (`ledger.rows.defer_writes`): the append's rows go with the fold's first statement,
    the fold's rows of all its tables in one, and all is sent before this returns.
    """
    take_append_lock(conn)  # before the savepoint: a lock taken in it would go with a rollback
    if not conn.info.get(SAVEPOINT_AT_BEGIN):
        execute_sql(conn, f"SAVEPOINT {APPEND_SAVEPOINT}")
    defer_writes(conn)
    try:
        appended = _append_locked(conn, commands)
        if not appended.events or folder is None:
            flush(conn)
            return appended, not appended.events
        try:
            folded = folder.fold_appended(conn, appended.before, appended.events)
            flush(conn)  # a fold's error raises here, in this try, not at the COMMIT
            return appended, folded
        except Exception as exc:  # noqa: BLE001 - the append stands; the runner retries the fold
            if conn.invalidated or getattr(exc, "connection_invalidated", False):
                raise  # the connection went (the database with it): the whole batch is undone
            # The append's rows may have gone with the fold's first statement, and the error
            # be theirs: written again alone, they raise it again (and no fold is blamed).
            discard(conn)
            execute_sql(conn, f"ROLLBACK TO SAVEPOINT {APPEND_SAVEPOINT}")
            insert_many(conn, events, appended.rows)
            flush(conn)
            logger.exception("evt=inline_fold_failed")
            return appended, False
    finally:
        stop_deferring(conn)


def _append_locked(conn: sa.Connection, commands: Sequence[Command]) -> Appended:
    head, state = _plan_state(conn, commands)
    planned_all: list[tuple[NewEvent, int]] = []
    spans: list[tuple[Command, int, int] | LedgerError] = []
    for command in commands:
        try:
            planned = command.plan(state)
        except LedgerError as exc:
            spans.append(exc)
            continue
        spans.append((command, len(planned_all), len(planned)))
        planned_all.extend(planned)
    now = datetime.now(UTC)
    rows = _rows(planned_all, head, now)
    if rows:
        insert_many(conn, events, rows)
    seqs = [row["seq"] for row in rows]
    results = [
        span
        if isinstance(span, LedgerError)
        else result_of(
            span[0], planned_all[span[1] : span[1] + span[2]], seqs[span[1] : span[1] + span[2]]
        )
        for span in spans
    ]
    return Appended(results, head[0], [_recorded(row) for row in rows], rows)


_IN_TABLE_ORDER = operator.itemgetter(*(column.name for column in events.c))


def _recorded(row: dict[str, Any]) -> RecordedEvent:
    # Decoded from the text just written, as every reader of the log does (`to_recorded`), not
    # taken from the Python objects: a fold sees exactly what a reader will (a datetime in data
    # is a string there).
    return to_recorded(_IN_TABLE_ORDER(row))


class Folder(Protocol):
    """Folds the events of an append into the projections inside its transaction."""

    def fold_appended(
        self, conn: sa.Connection, before: int, appended: list[RecordedEvent]
    ) -> bool:
        """In the append's transaction, touching nothing but `conn`, as its last work before the
        COMMIT: True when it folded them (False: the projections were not at `before`, the head
        before them; left to the runner). If it raises, `append_and_fold` undoes what it did."""
        ...

    def folded(self, seq: int) -> None:
        """On the event loop, after the commit of a transaction whose events were folded."""
        ...


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
        a future's callback one loop iteration later, after whatever input came meanwhile."""
        self._put(_Pending(command, answer=answer))

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
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), self._max_batch))]
            await self._commit_batch(batch)

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if p.waiting]
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

        def work(conn: sa.Connection) -> tuple[Appended, bool]:
            return append_and_fold(conn, commands, folder)

        if self._writes_plain:
            if self._writer is None:
                self._writer = SqliteWriter(self._engine)
            appended, folded = await self._writer.run(work)
        elif self._held is not None:
            appended, folded = await self._held.run(work)
        else:
            async with write_transaction(self._engine) as conn:
                appended, folded = await conn.run_sync(work)
        if appended.events and folded and folder is not None:
            folder.folded(appended.events[-1].seq)
        self._behind = self._behind or not folded
        return appended.results

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
