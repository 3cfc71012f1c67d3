"""Fresh databases for one bench run: a new SQLite file, or a PostgreSQL database of a random name
created on the given server and dropped after.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg


def sqlite_url(path: Path) -> str:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}"


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def postgres_dsn(url: str) -> str | None:
    """The driver's own address of a PostgreSQL database URL (None for SQLite's)."""
    return _plain(url) if url.startswith("postgresql") else None


@contextlib.asynccontextmanager
async def postgres_database(server_url: str, label: str = "bench") -> AsyncIterator[str]:
    """A new database on the server of `server_url` (any database there to connect to)."""
    name = f"hookledger_{label}_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(_plain(server_url), timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _plain(server_url).rsplit("/", 1)[0] + "/" + name
    finally:
        admin = await asyncpg.connect(_plain(server_url), timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
