"""The table a rebuild fills: which names it may take, and one rebuild per table at a time.

A rebuild drops and recreates its target, so a name is checked before anything is touched: never
one of hookledger's own tables (the log, the checkpoints, the projections, the list of rebuilt
tables, Alembic's), never a scratch table, never anything but a plain lower-case identifier. Of
the other names, which existing table a rebuild may replace is projections.target_marks's.

The claim on a target is held for the whole rebuild and let go by the database or the kernel
when its process dies, so a crashed rebuild never blocks the next one (its leftover table is
dropped and made again). PostgreSQL: a session advisory lock keyed by the table, tried, not
waited for. SQLite: `flock` on a file beside the database, one per table; per open file, so it
excludes another rebuild in the same process (two admin API requests) as well as in another one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.schema import metadata
from ledger.store import has_own_file
from projections.errors import InvalidRebuildTarget, RebuildInProgress
from projections.registry import PROJECTIONS

SCRATCH_SUFFIX = "__rebuild"  # `{projection}__rebuild`: the table a swapping rebuild fills
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SYSTEM_PREFIXES = ("sqlite_", "pg_")  # the databases' own namespaces


def scratch_table(projection: str) -> str:
    return projection + SCRATCH_SUFFIX


def own_tables() -> frozenset[str]:
    """Every table hookledger keeps: the ledger's and the projections' (one MetaData; the
    registry has imported every projection module), and Alembic's."""
    return (
        frozenset(metadata.tables)
        | {p.table.name for p in PROJECTIONS.values()}
        | {"alembic_version"}
    )


def check_target(table: str) -> None:
    """Raise InvalidRebuildTarget unless a rebuild may drop and fill `table`."""
    if not _PLAIN_NAME.fullmatch(table):
        raise InvalidRebuildTarget(
            table, "give a plain table name: a-z, 0-9 and _, not starting with a digit, ≤ 63"
        )
    if table in own_tables():
        raise InvalidRebuildTarget(table, "it is one of hookledger's own tables")
    if table.endswith(SCRATCH_SUFFIX) or table.startswith(_SYSTEM_PREFIXES):
        raise InvalidRebuildTarget(table, "the name is reserved")


@contextlib.asynccontextmanager
async def claim(engine: AsyncEngine, projection: str, table: str) -> AsyncIterator[None]:
    """Hold `table` for one rebuild of `projection`; RebuildInProgress if another holds it."""
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn, _advisory_claim(conn, projection, table):
            yield
        return
    if not has_own_file(engine):
        with _memory_claim(str(engine.url), projection, table):
            yield
        return
    with _file_claim(_claim_path(engine, table), projection, table):
        yield


def _lock_key(table: str) -> int:
    digest = hashlib.blake2b(f"hookledger.rebuild:{table}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextlib.asynccontextmanager
async def _advisory_claim(
    conn: AsyncConnection, projection: str, table: str
) -> AsyncIterator[None]:
    key = {"k": _lock_key(table)}
    # A session lock (not a transaction's): it spans the rebuild's many transactions.
    if not (await conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), key)).scalar():
        raise RebuildInProgress(projection, table)
    await conn.commit()
    try:
        yield
    finally:
        try:
            await conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), key)
            await conn.commit()
        except Exception:
            # Its session may hold the lock still: it must not go back to the pool.
            await conn.invalidate()
            raise


def _claim_path(engine: AsyncEngine, table: str) -> Path:
    database = engine.url.database
    assert database is not None
    return Path(database).with_name(f"{Path(database).name}-rebuild-{table}.lock")


@contextlib.contextmanager
def _file_claim(path: Path, projection: str, table: str) -> Iterator[None]:
    with path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RebuildInProgress(projection, table) from None
        yield  # closing the file lets the lock go (and so does the process's end)


_claimed_in_memory: set[tuple[str, str]] = set()  # (database URL, table)


@contextlib.contextmanager
def _memory_claim(url: str, projection: str, table: str) -> Iterator[None]:
    """A database in memory is this process's alone: a set of claims is enough."""
    if (url, table) in _claimed_in_memory:
        raise RebuildInProgress(projection, table)
    _claimed_in_memory.add((url, table))
    try:
        yield
    finally:
        _claimed_in_memory.discard((url, table))
