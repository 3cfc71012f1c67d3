"""The event store: engines for both backends, the append transaction, reads by `seq` and stream.

Every append runs under one lock (PostgreSQL: a transaction-scoped advisory lock; SQLite: the
database write lock, taken by BEGIN IMMEDIATE). Under it the appender reads the chain head, assigns
`seq` and `hash` itself and commits: commit order is `seq` order on both backends, so a reader
that follows `seq` never passes an event that becomes visible later.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ledger import walbuffer
from ledger.codec import GENESIS_HASH, loads
from ledger.events import RecordedEvent
from ledger.fields import Fields
from ledger.liveness import SERVER_SETTINGS, watch_peer
from ledger.rows import fetch_all, in_list, in_values, padded
from ledger.schema import LIMIT_ONE, SQLITE_RECURSIVE_TRIGGERS, events

APPEND_LOCK_ID = 0x686F6F6B  # "hook": the advisory lock every appender takes on PostgreSQL
WRITE_OPTION = "hookledger_write"
BUSY_TIMEOUT_MS = 30_000  # how long a SQLite connection waits for another process's write lock


def _null(_: None) -> None:
    return None


# The stdlib's sqlite3 binds an int, a float or a str at once, but looks for an adapter for any
# other value, None included: a registry miss, then `__adapt__` and `__conform__` looked up on
# the protocol's and the value's types, ~0.2 us a NULL. An execution's row binds eight NULLs
# (its columns not yet known), so the registry answers None itself (bench/README, session 17).
sqlite3.register_adapter(type(None), _null)


def normalise_url(url: str) -> str:
    """Accept plain `sqlite:///` and `postgresql://` URLs and pick the asyncio drivers."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def create_engine(
    url: str, *, server_settings: Mapping[str, str] | None = None, **kw: Any
) -> AsyncEngine:
    """An engine for `url`; on PostgreSQL its sessions with `server_settings` besides ours."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        return _sqlite_engine(url, **kw)
    if kw.get("poolclass") is not sa.pool.NullPool:
        kw.setdefault("pool_size", 10)
        kw.setdefault("max_overflow", 10)
        kw.setdefault("pool_pre_ping", True)
    # An acknowledged delivery must survive a crash: never let a server default weaken commits.
    settings = {"synchronous_commit": "on", **SERVER_SETTINGS, **(server_settings or {})}
    kw.setdefault("connect_args", {"server_settings": settings})
    engine = create_async_engine(url, **kw)
    if engine.dialect.name == "postgresql":
        sa_event.listen(engine.sync_engine, "connect", _watch_peer)
    return engine


def _watch_peer(dbapi_conn: Any, _record: Any) -> None:
    watch_peer(dbapi_conn.driver_connection)


def _sqlite_engine(url: str, **kw: Any) -> AsyncEngine:
    engine = create_async_engine(url, connect_args={"timeout": 30}, **kw)
    _configure_sqlite(engine.sync_engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    """Every SQLite connection, async or the writer's: WAL, FULL sync, and our own BEGIN."""

    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN IMMEDIATE is ours to emit.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged delivery survives power loss
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS:d}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(SQLITE_RECURSIVE_TRIGGERS)  # a REPLACE on events meets the delete guard
        cursor.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.connection.driver_connection.in_transaction:
            return  # begun on the driver (the appender's SqliteWriter): SQLAlchemy's is in it
        # Writers take the write lock up front, so that what they read under it stays true.
        is_write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if is_write else "BEGIN")


def is_postgres(conn: AsyncConnection | AsyncEngine) -> bool:
    return conn.dialect.name == "postgresql"


# PostgreSQL: plans of index probes joined by nested loops, whatever the statistics say. Every
# statement of an append, of its folds and of the projector's catch-up reaches a batch's rows
# through an index (the originals by their key, the folds' rows by theirs); none gains from a
# scan or a hash. And a new deployment's tables grow faster than autovacuum analyses them:
# with statistics saying a few rows, a batch's duplicates were folded into
# `trigger_executions` by a hash join over a scan of the whole table (6 ms a batch at 12k rows,
# growing with the table). The appender's session has them (ledger/held.py `APPEND_SESSION`),
# the projector's catch-up each transaction (`plan_by_index`).
INDEX_PLANS = {"enable_seqscan": "off", "enable_hashjoin": "off", "enable_mergejoin": "off"}
_PLAN_BY_INDEX = sa.text(
    "SELECT "
    + ", ".join(f"set_config('{name}', '{value}', true)" for name, value in INDEX_PLANS.items())
)


async def plan_by_index(conn: AsyncConnection) -> None:
    """PostgreSQL: the rest of this transaction plans as `INDEX_PLANS` says (SET LOCAL)."""
    await conn.execute(_PLAN_BY_INDEX)


async def write_connection(engine: AsyncEngine) -> AsyncConnection:
    """A connection whose transactions take the append lock (SQLite: BEGIN IMMEDIATE)."""
    conn = await engine.connect()
    return await conn.execution_options(**{WRITE_OPTION: True})


def take_append_lock(conn: sa.Connection) -> None:
    if conn.dialect.name == "postgresql" and not conn.info.get(LOCKED_AT_BEGIN):
        fetch_all(conn, _APPEND_LOCK, {"k": APPEND_LOCK_ID})


# Set on a connection while its transaction holds the append lock since its BEGIN
# (ledger.held.HeldConnection).
LOCKED_AT_BEGIN = "hookledger_append_locked"
# And while the append's savepoint (`APPEND_SAVEPOINT`) stands since that BEGIN, opened with it.
SAVEPOINT_AT_BEGIN = "hookledger_append_savepoint"
APPEND_SAVEPOINT = "append"
# PostgreSQL's held connection (ledger.held), no transaction begun: the BEGIN with the lock and
# the savepoint, `begin(conn)`, left to the append, which may send its batch as one statement in
# autocommit instead (ledger.append `_append_alone`); `COMMITTED_ALONE` is set when it did.
BEGIN_LATE = "hookledger_begin_late"
COMMITTED_ALONE = "hookledger_committed_alone"


_APPEND_LOCK = sa.text("SELECT pg_advisory_xact_lock(:k)")
_HEAD = sa.select(events.c.seq, events.c.hash).order_by(events.c.seq.desc()).limit(LIMIT_ONE)


@functools.lru_cache(maxsize=16)
def _versions_statement(size: int) -> sa.Select[Any]:
    return (
        sa.select(events.c.stream, sa.func.max(events.c.version))
        .where(events.c.stream.in_(in_list(events.c.stream, "stream", size)))
        .group_by(events.c.stream)
    )


def read_head(conn: sa.Connection) -> tuple[int, str]:
    """The last event's seq and hash (0 and the genesis hash for an empty log)."""
    rows = fetch_all(conn, _HEAD)
    return head_of(*rows[0]) if rows else head_of(None, None)


def read_head_statement() -> sa.Select[Any]:
    """`read_head`'s query (its seq and hash; no row for an empty log), to read with others."""
    return _HEAD


def head_of(seq: int | None, hash_: str | None) -> tuple[int, str]:
    """The head from `read_head_statement`'s columns (None: an empty log, 0 and the genesis)."""
    return (0, GENESIS_HASH) if seq is None or hash_ is None else (seq, hash_)


def read_versions(conn: sa.Connection, streams: Sequence[str]) -> dict[str, int]:
    """The current version of each stream that has events (the append core: sync)."""
    if not streams:
        return {}
    asked = padded(sorted(set(streams)))
    rows = fetch_all(conn, _versions_statement(len(asked)), in_values("stream", asked))
    return {stream: version for stream, version in rows}


async def read_last_seq(conn: AsyncConnection) -> int:
    result = await conn.execute(sa.select(sa.func.coalesce(sa.func.max(events.c.seq), 0)))
    return int(result.scalar_one())


def to_recorded(row: Any) -> RecordedEvent:
    """A row of `select(events)` (every column, in table order) as a RecordedEvent."""
    # By position: reading a SQLAlchemy row by name costs ~1.5 us a column, more than decoding
    # the event, and every read of the log (projector, rebuild) comes through here.
    seq, id_, stream, version, type_, trigger_id, key, data, meta, recorded_at, hash_ = row
    return _RECORDED.made(
        (
            seq,
            id_,
            stream,
            version,
            type_,
            trigger_id,
            key,
            loads(data),
            loads(meta),
            recorded_at,
            hash_,
        )
    )


_RECORDED = Fields(RecordedEvent)  # its fields are the table's columns, in the same order


def _filtered(
    query: sa.Select[Any], *, types: Sequence[str] | None, trigger_id: str | None
) -> sa.Select[Any]:
    if types:
        query = query.where(events.c.type.in_(list(types)))
    if trigger_id:
        query = query.where(events.c.trigger_id == trigger_id)
    return query


async def read_events(
    conn: AsyncConnection,
    *,
    after: int = 0,
    limit: int = 100,
    until: int | None = None,
    types: Sequence[str] | None = None,
    trigger_id: str | None = None,
) -> list[RecordedEvent]:
    """Events with seq > after (and <= until), in seq order, at most `limit`."""
    query = sa.select(events).where(events.c.seq > after)
    if until is not None:
        query = query.where(events.c.seq <= until)
    query = _filtered(query, types=types, trigger_id=trigger_id).order_by(events.c.seq).limit(limit)
    return [to_recorded(row) for row in (await conn.execute(query)).all()]


async def iter_events(
    engine: AsyncEngine, *, after: int = 0, until: int | None = None, batch: int = 5000
) -> AsyncIterator[list[RecordedEvent]]:
    """The log in bounded batches, each read in its own short transaction: memory stays flat."""
    while True:
        async with engine.connect() as conn:
            chunk = await read_events(conn, after=after, until=until, limit=batch)
        if not chunk:
            return
        yield chunk
        after = chunk[-1].seq


async def read_event(conn: AsyncConnection, seq: int) -> RecordedEvent | None:
    row = (await conn.execute(sa.select(events).where(events.c.seq == seq))).first()
    return to_recorded(row) if row else None


async def read_stream(conn: AsyncConnection, stream: str) -> list[RecordedEvent]:
    query = sa.select(events).where(events.c.stream == stream).order_by(events.c.version)
    return [to_recorded(row) for row in (await conn.execute(query)).all()]


async def first_seq_at(conn: AsyncConnection, moment: datetime) -> int:
    """The last seq recorded at or before `moment` (for point-in-time rebuilds)."""
    query = sa.select(sa.func.coalesce(sa.func.max(events.c.seq), 0)).where(
        events.c.recorded_at <= moment
    )
    return int((await conn.execute(query)).scalar_one())


# Keyed by the engine itself, weakly: keyed by id(), a new engine could inherit the lock of a
# collected one at the same address, still held by a transaction its closed loop abandoned, and
# every write of the new engine would wait forever.
_write_locks: weakref.WeakKeyDictionary[Engine, asyncio.Lock] = weakref.WeakKeyDictionary()


def process_write_lock(engine: AsyncEngine) -> asyncio.Lock:
    # SQLite has one writer: inside a process, writers queue on an asyncio lock instead of
    # spinning in SQLite's busy handler, whose sleeps would show up as latency spikes.
    lock = _write_locks.get(engine.sync_engine)
    if lock is None:
        lock = _write_locks[engine.sync_engine] = asyncio.Lock()
    return lock


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that may write (SQLite: BEGIN IMMEDIATE, one writer at a time per process)."""
    lock = process_write_lock(engine) if engine.dialect.name == "sqlite" else None
    if lock is not None:
        await lock.acquire()
    try:
        conn = await write_connection(engine)
        try:
            async with conn.begin():
                yield conn
        finally:
            await conn.close()
    finally:
        if lock is not None:
            lock.release()


def has_own_file(engine: AsyncEngine) -> bool:
    """An SQLite database in a file (a second connection, the writer's, sees the same data)."""
    url = engine.url
    return (
        url.get_backend_name() == "sqlite"
        and url.database not in (None, "", ":memory:")
        and "mode=memory" not in str(url)
    )


def unpooled_engine(
    engine: AsyncEngine, server_settings: Mapping[str, str] | None = None
) -> AsyncEngine:
    """An engine on the same PostgreSQL database, configured as `engine` (and with
    `server_settings`), whose connections are each new: for one kept for long (the appender's),
    never one the pool hands back after a ping that may wait on a path gone silent."""
    url = engine.url.render_as_string(hide_password=False)
    return create_engine(url, server_settings=server_settings, poolclass=sa.pool.NullPool)


def plain_sqlite_engine(engine: AsyncEngine) -> Engine:
    """A synchronous engine (the stdlib's sqlite3) on the same file, configured as `engine`."""
    url = engine.url.set(drivername="sqlite+pysqlite")
    # Its connections may be used from one thread and committed or closed from another.
    connect_args: dict[str, Any] = {"timeout": 30, "check_same_thread": False}
    vfs = walbuffer.name() if has_own_file(engine) and not url.query else None
    if vfs is not None and url.database is not None:
        # Its WAL written a transaction at a time (ledger/walbuffer.py).
        path = walbuffer.uri(url.database, vfs)
        plain = sa.create_engine(
            url, pool_size=1, creator=lambda: sqlite3.connect(path, uri=True, **connect_args)
        )
    else:
        plain = sa.create_engine(url, pool_size=1, connect_args=connect_args)
    _configure_sqlite(plain)
    return plain


def write_options(conn: sa.Connection) -> sa.Connection:
    """`conn`, its transactions taking the write lock (SQLite: BEGIN IMMEDIATE)."""
    return conn.execution_options(**{WRITE_OPTION: True})
