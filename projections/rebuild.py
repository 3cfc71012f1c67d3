"""Rebuild a projection from the log into a shadow table, then swap it in (or keep it aside).

The live table keeps serving while the shadow fills; the swap is one transaction that also sets
the checkpoint to the rebuilt position, so the live runner goes on from there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.events import RecordedEvent
from ledger.rows import fetch_all
from ledger.schema import events
from ledger.store import (
    has_own_file,
    iter_events,
    plain_sqlite_engine,
    read_last_seq,
    to_recorded,
    write_options,
    write_transaction,
)
from projections.base import IN_WINDOW, BulkFold, Projection
from projections.runner import _take_projector_lock, set_checkpoint
from projections.target_marks import make_target
from projections.targets import check_target, claim, scratch_table

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, int], None]  # (seq reached, target seq, events done)
BATCH = 5000  # events per read and per write transaction: memory stays flat whatever the log
WINDOW = 50_000  # seqs per write transaction of a bulk fold (projections.base.BulkFold)


@dataclass(frozen=True, slots=True)
class RebuildResult:
    name: str
    table: str
    until_seq: int
    events: int
    seconds: float
    swapped: bool


async def _recreate(engine: AsyncEngine, shadow: sa.Table, live: str) -> sa.Table:
    """The scratch table, made as the live one stands, so that the swap leaves the schema as
    the migrations made it: the columns in the live table's order (a migration adds a column
    last, where the model may list it elsewhere), and the primary key named as theirs name it
    (`pk_<table>`). SQLite's constraint names are text in the CREATE statement, which no rename
    changes, so it is given now; PostgreSQL's are index names, one per schema, the live one's
    taken until the swap drops it, so `_swap` renames it there. Its name is reserved, so what
    holds it is a dead rebuild's leftover."""
    async with write_transaction(engine) as conn:
        order = await conn.run_sync(
            lambda sync: [c["name"] for c in sa.inspect(sync).get_columns(live)]
        )
        table = shadow
        if sorted(order) == sorted(shadow.c.keys()):
            # Column._copy(): the column whole (type, nullability, key), as Table.to_metadata
            # copies it; the public copy() is deprecated for it.
            table = sa.Table(shadow.name, sa.MetaData(), *(shadow.c[n]._copy() for n in order))
        sqlite = conn.dialect.name == "sqlite"
        table.primary_key.name = f"pk_{live}" if sqlite else f"pk_{table.name}"
        await conn.run_sync(lambda sync: table.drop(sync, checkfirst=True))
        await conn.run_sync(lambda sync: table.create(sync))
    return table


async def _make_into(
    engine: AsyncEngine, projection: Projection, table: sa.Table, until: int, *, replace: bool
) -> None:
    async with write_transaction(engine) as conn:
        await make_target(conn, table, projection=projection.name, until_seq=until, replace=replace)


async def _fill(
    engine: AsyncEngine,
    projection: Projection,
    table: sa.Table,
    until: int,
    progress: Progress | None,
    window: int,
) -> int:
    if has_own_file(engine):
        return await asyncio.to_thread(
            _fill_sqlite, engine, projection, table, until, progress, window
        )
    done = 0
    if projection.bulk is not None:
        statements = _BulkStatements.of(projection.bulk, table, engine.dialect.name)
        for after, upto in _windows(until, window):
            async with write_transaction(engine) as conn:
                done += await conn.run_sync(
                    _fold_window, projection, table, statements, after, upto, until
                )
            if progress:
                progress(upto, until, done)
        return done
    batches = aiter(iter_events(engine, until=until, batch=BATCH))
    reading = asyncio.ensure_future(anext(batches, None))
    while (batch := await reading) is not None:
        # Read the next batch (its own connection, a WAL reader) while this one is folded in:
        # the database works while Python decodes and folds. Two batches in memory at most.
        reading = asyncio.ensure_future(anext(batches, None))
        async with write_transaction(engine) as conn:
            await conn.run_sync(projection.apply, table, batch)
        done += len(batch)
        if progress:
            progress(batch[-1].seq, until, done)
    return done


def _fill_sqlite(
    engine: AsyncEngine,
    projection: Projection,
    table: sa.Table,
    until: int,
    progress: Progress | None,
    window: int,
) -> int:
    """`_fill` on SQLite, in a thread of its own with plain sqlite3 connections: no hop per
    statement, and the server's loop (an admin API rebuild) never waits for it. A reader thread
    fetches and decodes the next batch while this one is folded in; two batches in memory."""
    plain = plain_sqlite_engine(engine)
    done = 0
    try:
        if projection.bulk is not None:
            statements = _BulkStatements.of(projection.bulk, table, "sqlite")
            with write_options(plain.connect()) as write_conn:
                driver = write_conn.connection.driver_connection
                assert driver is not None
                for after, upto in _windows(until, window):
                    # A fill that dies is started again, so only the last window's commit is
                    # synced; syncing the WAL makes every earlier window durable with it.
                    driver.execute(f"PRAGMA synchronous={'FULL' if upto == until else 'NORMAL'}")
                    with write_conn.begin():
                        done += _fold_window(
                            write_conn, projection, table, statements, after, upto, until
                        )
                    if progress:
                        progress(upto, until, done)
            return done
        with (
            ThreadPoolExecutor(1, thread_name_prefix="hookledger-rebuild-read") as reader,
            plain.connect() as read_conn,
            write_options(plain.connect()) as write_conn,
        ):
            reading = reader.submit(_read_batch, read_conn, 0, until)
            while batch := reading.result():
                reading = reader.submit(_read_batch, read_conn, batch[-1].seq, until)
                with write_conn.begin():
                    projection.apply(write_conn, table, batch)
                done += len(batch)
                if progress:
                    progress(batch[-1].seq, until, done)
    finally:
        plain.dispose()
    return done


def _windows(until: int, window: int) -> Iterator[tuple[int, int]]:
    """(after, until) of each window of `window` seqs, the last one ending at `until`."""
    for after in range(0, until, window):
        yield after, min(after + window, until)


@dataclass(frozen=True, slots=True)
class _BulkStatements:
    """A bulk fold's statements for one target table and dialect, built once per rebuild."""

    create: sa.Executable
    rest: sa.Select[Any]  # the window's events the bulk fold leaves to `apply`, a batch at a time
    amend: sa.Executable

    @classmethod
    def of(cls, bulk: BulkFold, table: sa.Table, dialect: str) -> _BulkStatements:
        return cls(
            create=bulk.create(table, dialect),
            rest=sa.select(events)
            .where(IN_WINDOW, sa.not_(bulk.covers))
            .order_by(events.c.seq)
            .limit(BATCH),
            amend=bulk.amend(table, dialect),
        )


def _fold_window(
    conn: sa.Connection,
    projection: Projection,
    table: sa.Table,
    statements: _BulkStatements,
    after: int,
    upto: int,
    until: int,
) -> int:
    """The window (after, upto] of a bulk rebuild up to `until`, in the caller's transaction:
    the bulk fold's `create`, then the other events through `apply` in seq order; with the last
    window, the `amend` of the whole log, once (projections.base.BulkFold): each row it changes
    is written once, where an `amend` a window rewrote rows spread over the whole table, window
    after window. Returns how many events the window holds."""
    window = {"after": after, "until": upto}
    conn.execute(statements.create, window)
    reached = after
    while batch := fetch_all(conn, statements.rest, window | {"after": reached}):
        projection.apply(conn, table, [to_recorded(row) for row in batch])
        reached = batch[-1][0]
    if upto == until:
        conn.execute(statements.amend, {"after": 0, "until": until})
    return upto - after  # seq is gap-free (the appender assigns head + 1, …, under its lock)


# The raw driver's rows: SQLAlchemy's row processing cost more than decoding the event.
_BATCH_SQL = (
    f"SELECT {', '.join(c.name for c in events.c)} FROM events"  # noqa: S608 - our own names
    " WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
)


def _read_batch(conn: sa.Connection, after: int, until: int) -> list[RecordedEvent]:
    driver = conn.connection.driver_connection
    assert driver is not None
    with conn.begin():  # one snapshot per batch: the WAL is not pinned for the whole rebuild
        rows = driver.execute(_BATCH_SQL, (after, until, BATCH)).fetchall()
    # recorded_at as SQLAlchemy stores it on SQLite: naive ISO text in UTC, one per append
    # transaction, so parsed once for all the events that share it.
    moments: dict[str, datetime] = {}
    events_ = []
    for row in rows:
        moment = moments.get(row[9])
        if moment is None:
            moment = moments[row[9]] = datetime.fromisoformat(row[9]).replace(tzinfo=UTC)
        events_.append(to_recorded((*row[:9], moment, row[10])))
    return events_


def _create_index(sync: sa.Connection, index: sa.Index) -> None:
    index.create(sync)


async def _swap(engine: AsyncEngine, projection: Projection, shadow: str, until: int) -> None:
    live = projection.table.name
    async with write_transaction(engine) as conn:
        await _take_projector_lock(conn, wait=True)
        await conn.execute(sa.text(f'DROP TABLE "{live}"'))
        await conn.execute(sa.text(f'ALTER TABLE "{shadow}" RENAME TO "{live}"'))
        if conn.dialect.name == "postgresql":
            await _rename_primary_key(conn, live)
        for index in projection.index_ddl(live):
            await conn.run_sync(_create_index, index)
        await set_checkpoint(conn, projection.name, until)


async def _rename_primary_key(conn: AsyncConnection, live: str) -> None:
    """The swapped-in table's primary key given its migration's name (`_recreate`), found by
    what it is: a table swapped in before this named it `<scratch table>_pkey`."""
    current = await conn.scalar(
        sa.text(
            "SELECT conname FROM pg_constraint"
            " WHERE conrelid = CAST(:table AS regclass) AND contype = 'p'"
        ),
        {"table": f'"{live}"'},
    )
    wanted = f"pk_{live}"
    if current is not None and current != wanted:
        await conn.execute(
            sa.text(f'ALTER TABLE "{live}" RENAME CONSTRAINT "{current}" TO "{wanted}"')
        )


async def rebuild(
    engine: AsyncEngine,
    projection: Projection,
    *,
    until_seq: int | None = None,
    into: str | None = None,
    progress: Progress | None = None,
    window: int = WINDOW,
    replace: bool = False,
) -> RebuildResult:
    """Rebuild `projection` from the log up to `until_seq` (default: the head).

    With `into`, the result stays in that table and the live one is untouched (point in time);
    `into` is never one of hookledger's own tables (InvalidRebuildTarget), and a table of that
    name is dropped only when a rebuild made it, or when `replace` asks for it
    (RebuildTargetExists, nothing changed, otherwise: projections.target_marks). One rebuild
    fills a table at a time: another one of the same target raises RebuildInProgress.
    """
    if into is not None:
        check_target(into)
    elif replace:
        raise ValueError("replace is for an `into` table: a swap always replaces the live one")
    target = into or scratch_table(projection.name)
    async with claim(engine, projection.name, target):
        started = time.monotonic()
        async with engine.connect() as conn:
            head = await read_last_seq(conn)
        until = head if until_seq is None else min(until_seq, head)
        table = projection.shadow_table(target)
        if into is None:
            table = await _recreate(engine, table, projection.table.name)
        else:
            await _make_into(engine, projection, table, until, replace=replace)
        done = await _fill(engine, projection, table, until, progress, window)
        if into is None:
            await _swap(engine, projection, target, until)
    seconds = time.monotonic() - started
    logger.info("evt=rebuilt projection=%s events=%d seconds=%.2f", projection.name, done, seconds)
    return RebuildResult(
        projection.name, into or projection.table.name, until, done, seconds, into is None
    )
