"""One append transaction: read the head of the log and what planning needs, plan each command
(ledger.commands), assign `seq`, `version` and `hash`, insert the rows, and fold the new events
into the projections in the same transaction (`append_and_fold`), under the append lock.

Plain SQLAlchemy Core on a sync connection, so one call runs a whole transaction on any backend's
way of running it (ledger.writers, ledger.held); the group commit that batches callers is
ledger.appender.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.codec import canonical_bytes, chain_hash, dumps, format_time
from ledger.commands import AppendEvents, Command, PlanState, RecordDelivery, result_of
from ledger.deferred import alone, defer_writes, discard, flush, send_alone, stop_deferring
from ledger.errors import LedgerError
from ledger.events import Encoded, NewEvent, RecordedEvent
from ledger.known import expected_head, known_log, leave, leave_unread_next, unread_next
from ledger.originals import _read_head_and_originals
from ledger.rows import execute_sql, insert_many
from ledger.schema import events
from ledger.store import (
    APPEND_LOCK_ID,
    APPEND_SAVEPOINT,
    BEGIN_LATE,
    COMMITTED_ALONE,
    SAVEPOINT_AT_BEGIN,
    read_versions,
    take_append_lock,
    to_recorded,
)

logger = logging.getLogger(__name__)


# After a batch planned as new broke a unique index (a key received before, most often), the
# held connection's batches are planned on the log for this long: each such miss costs a failed
# statement and an `ERROR: duplicate key …` line in PostgreSQL's own log, so a sender that
# retries now and then between new deliveries makes at most one a second.
PLAN_ON_LOG_AFTER_MISS_S = 1.0
_PLANNED_ON_LOG_UNTIL = "hookledger_planned_on_log_until"
# Likewise, after a batch that could not go as one statement (`_append_alone`), for this long the
# held connection's batches go in transactions: a fold that reads, say, would otherwise cost
# every batch its planning twice.
_ALONE_AFTER = "hookledger_alone_after"


def _plan_state(
    conn: sa.Connection, commands: Sequence[Command], assumed: tuple[int, str] | None = None
) -> tuple[tuple[int, str], PlanState, bool]:
    """The head of the log, what planning `commands` reads, and whether an original was read
    (one the connection did not know: ledger.known); with `assumed`, that head, the originals
    the connection knows and every other delivery new, nothing read."""
    keys = {key for c in commands if isinstance(c, RecordDelivery) and (key := c.key)}
    if assumed is not None:
        known = known_log(conn)
        originals, versions = known.recall(keys) if known is not None else ({}, {})
        return assumed, PlanState(versions, originals), False
    head, originals, versions, found = _read_head_and_originals(conn, keys)
    streams = [s for c in commands if isinstance(c, AppendEvents) for s in c.streams]
    return head, PlanState(read_versions(conn, streams) | versions, originals), found


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
    head: tuple[int, str]  # the head's seq and hash after it
    knew_all: bool  # it read no original: each was known (ledger.known), or none was


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


class FoldFailed(Exception):
    """An inline fold failed in a transaction that has no savepoint to undo it to
    (`append_and_fold(..., redone=True)`): the caller rolls the whole transaction back and
    appends the same commands again without folding. The fold's error is the cause."""


def append_and_fold(
    conn: sa.Connection,
    commands: Sequence[Command],
    folder: Folder | None,
    *,
    redone: bool = False,
) -> tuple[Appended, bool]:
    """The appender's transaction: `append_batch`, then the new events folded into the
    projections by `folder` in the same transaction; True when they were (or there were none).

    A fold that fails must not cost the append (the runner folds the events later, and says
    why it cannot). Either everything after the savepoint opened before the append is rolled
    back and the append's rows are written again; or, when the caller says a failed fold is
    `redone`, no savepoint is opened and FoldFailed raised: the caller rolls back and appends
    again with no folder. SQLite's appender does the latter: a savepoint there copies every
    page the transaction changes into its journal, a cost every append paid for a fold that
    fails perhaps never. The savepoint stands from the start, not between the append and the
    fold: on PostgreSQL the held connection opens it with BEGIN and the lock, so it costs no
    round trip of its own. On PostgreSQL the writes also wait for the statement after them
    (`ledger.deferred.defer_writes`): the append's rows go with the fold's first statement, the
    fold's rows of all its tables in one, and all is sent before this returns. And when the held
    connection left the transaction unbegun (`BEGIN_LATE`), a batch planned without a read goes
    as one statement, its own transaction (`_append_alone`); if it cannot, the BEGIN is sent
    and all goes as above.
    """
    assumed = expected_head(conn)
    if assumed is not None and not all(isinstance(c, RecordDelivery) for c in commands):
        assumed = None
    # Left by the held connection only when `goes_alone_next` said so: no cooldown stands.
    begin = conn.info.pop(BEGIN_LATE, None)
    if begin is not None:
        if assumed is not None:
            try:
                done = _append_alone(conn, commands, folder, assumed)
            except Exception as exc:  # noqa: BLE001 - met again below, as it always was
                if conn.invalidated or getattr(exc, "connection_invalidated", False):
                    raise
                # Nothing was written; the batch goes in a transaction, where each cause is met
                # as it always was. A miss (a key received before unknown here, or another
                # process appended): planned on the log. Else another statement was needed
                # (`NotAlone`: a fold that reads), the checkpoints had moved, or a fold failed.
                until = time.monotonic() + PLAN_ON_LOG_AFTER_MISS_S
                if isinstance(exc, sa.exc.IntegrityError):
                    conn.info[_PLANNED_ON_LOG_UNTIL] = until
                    assumed = None
                else:
                    conn.info[_ALONE_AFTER] = until
            else:
                conn.info[COMMITTED_ALONE] = True
                return done
        begin(conn)
    return _append_in_transaction(conn, commands, folder, redone, assumed)


def goes_alone_next(conn: sa.Connection) -> bool:
    """Whether the held connection's next batch may go as one statement (`_append_alone`):
    it will be planned without a read, and no batch that could not go so failed just now."""
    return unread_next(conn) and time.monotonic() >= conn.info.get(_ALONE_AFTER, 0.0)


def _append_alone(
    conn: sa.Connection,
    commands: Sequence[Command],
    folder: Folder | None,
    assumed: tuple[int, str],
) -> tuple[Appended, bool]:
    """PostgreSQL's held connection, no transaction begun (`BEGIN_LATE`): the batch planned on
    the head its last append left, as `append_and_fold` does, and its rows, the fold's and the
    checkpoints' move sent as one statement, which PostgreSQL runs as its own transaction: one
    round trip for the batch (the COMMIT's was a sixth of its time under load). The statement
    takes the append lock before it writes anything (ledger.deferred `send_alone`), and fails
    whole when a unique index breaks (a miss, IntegrityError) or the fold's checkpoints were not
    all at the head before it. Nothing else may be sent before it (ledger.compiled `NotAlone`)."""
    alone(conn)
    try:
        appended = _append_locked(conn, commands, assumed)
        folded = not appended.events
        if appended.events and folder is not None:
            folded = folder.fold_appended(conn, appended.before, appended.events)
        send_alone(conn, f"pg_advisory_xact_lock({APPEND_LOCK_ID:d})")
    finally:
        stop_deferring(conn)
    _next_unread_if_known(conn, appended)
    return appended, folded


def _append_in_transaction(
    conn: sa.Connection,
    commands: Sequence[Command],
    folder: Folder | None,
    redone: bool,
    assumed: tuple[int, str] | None,
) -> tuple[Appended, bool]:
    take_append_lock(conn)  # before the savepoint: a lock taken in it would go with a rollback
    if folder is not None and not redone and not conn.info.get(SAVEPOINT_AT_BEGIN):
        execute_sql(conn, f"SAVEPOINT {APPEND_SAVEPOINT}")
    # PostgreSQL's held connection: deliveries alone, after an append of that connection that
    # read no original it did not know, are planned on the head it left and on what it knows
    # (ledger.known: a known key's delivery is its duplicate, any other is new), without reading
    # the head or the originals (one round trip fewer a batch). When one was received before
    # unknown here, or another process appended since, the insert breaks a unique index (the
    # idempotency arbiter, or `seq`'s): the statement writes nothing, the transaction goes back
    # to the savepoint, and the batch is planned on what the log holds. The expectation is
    # taken here; the head this append leaves becomes the next one's only when its COMMIT
    # succeeds (ledger.known `learned_at_commit`, by ledger.held).
    defer_writes(conn)
    try:
        if assumed is not None:
            try:
                done = _append_and_fold_once(conn, commands, folder, redone, assumed)
            except sa.exc.IntegrityError:
                if conn.invalidated:
                    raise
                discard(conn)
                execute_sql(conn, f"ROLLBACK TO SAVEPOINT {APPEND_SAVEPOINT}")
                conn.info[_PLANNED_ON_LOG_UNTIL] = time.monotonic() + PLAN_ON_LOG_AFTER_MISS_S
                done = _append_and_fold_once(conn, commands, folder, redone, None)
        else:
            done = _append_and_fold_once(conn, commands, folder, redone, None)
    finally:
        stop_deferring(conn)
    _next_unread_if_known(conn, done[0])
    return done


def _next_unread_if_known(conn: sa.Connection, appended: Appended) -> None:
    """The held connection's append that read no original it did not know, not within a while
    of a miss: the next batch of deliveries may be planned without a read, once it commits."""
    if (
        appended.knew_all
        and conn.info.get(SAVEPOINT_AT_BEGIN)  # the held connection's
        and time.monotonic() >= conn.info.get(_PLANNED_ON_LOG_UNTIL, 0.0)
    ):
        leave_unread_next(conn)


def _append_and_fold_once(
    conn: sa.Connection,
    commands: Sequence[Command],
    folder: Folder | None,
    redone: bool,
    assumed: tuple[int, str] | None,
) -> tuple[Appended, bool]:
    appended = _append_locked(conn, commands, assumed)
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
        if assumed is not None and isinstance(exc, sa.exc.IntegrityError):
            raise  # the rows planned on the expected head: planned again on the log's
        if redone:
            raise FoldFailed("the inline fold failed") from exc
        quiet = isinstance(exc, CheckpointsMoved)
        # The append's rows may have gone with the fold's first statement, and the error
        # be theirs: written again alone, they raise it again (and no fold is blamed).
        discard(conn)
        execute_sql(conn, f"ROLLBACK TO SAVEPOINT {APPEND_SAVEPOINT}")
        insert_many(conn, events, appended.rows)
        flush(conn)
        if not quiet:
            logger.exception("evt=inline_fold_failed")
        return appended, False


def _append_locked(
    conn: sa.Connection, commands: Sequence[Command], assumed: tuple[int, str] | None = None
) -> Appended:
    head, state, found = _plan_state(conn, commands, assumed)
    planned_all: list[tuple[NewEvent, int]] = []
    spans: list[tuple[Command, int, int] | Exception] = []
    for command in commands:
        try:
            planned = _encoded(command).plan(state)
        except (LedgerError, orjson.JSONEncodeError) as exc:
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
        if isinstance(span, Exception)
        else result_of(
            span[0], planned_all[span[1] : span[1] + span[2]], seqs[span[1] : span[1] + span[2]]
        )
        for span in spans
    ]
    after = (rows[-1]["seq"], rows[-1]["hash"]) if rows else head
    leave(conn, after, state)  # what the connection knows of the log, once this is committed
    recorded = [_recorded(row) for row in rows]
    return Appended(results, head[0], recorded, rows, after, not found)


def _encoded(command: Command) -> Command:
    """`command` with its events' data and meta encoded as stored, before it is planned: what
    orjson cannot write (nested past 254 levels, though it reads 1,024: FACTS.md) fails that
    command alone, not every command of its batch in `_rows`. A delivery comes encoded."""
    if isinstance(command, RecordDelivery):
        return command
    encoded = [
        replace(event, data=Encoded(dumps(event.data)), meta=Encoded(dumps(event.meta)))
        for event in command.events
    ]
    return AppendEvents(events=encoded, expected_version=command.expected_version)


_IN_TABLE_ORDER = operator.itemgetter(*(column.name for column in events.c))


def _recorded(row: dict[str, Any]) -> RecordedEvent:
    # Decoded from the text just written, as every reader of the log does (`to_recorded`), not
    # taken from the Python objects: a fold sees exactly what a reader will (a datetime in data
    # is a string there).
    return to_recorded(_IN_TABLE_ORDER(row))


class CheckpointsMoved(Exception):  # noqa: N818 - a signal, not a failure
    """A folder whose writes went with the statement that checks the checkpoints found them
    moved (no longer at the head before the append): `append_and_fold` undoes the fold, keeps
    the append and says nothing; the runner folds those events later."""


class Folder(Protocol):
    """Folds the events of an append into the projections inside its transaction."""

    def fold_appended(
        self, conn: sa.Connection, before: int, appended: list[RecordedEvent]
    ) -> bool:
        """In the append's transaction, touching nothing but `conn`, as its last work before the
        COMMIT: True when it folded them (False: the projections were not at `before`, the head
        before them; left to the runner). If it raises, `append_and_fold` undoes what it did."""
        ...

    def folded(self, appended: list[RecordedEvent]) -> None:
        """On the event loop, after the commit of a transaction whose events were folded."""
        ...
