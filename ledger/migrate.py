"""Schema migrations with Alembic, run automatically and idempotently at start-up."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.store import is_postgres, write_transaction

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATE_LOCK_ID = 0x6D696772  # "migr": one process migrates at a time


def _config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def _current(connection: sa.Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> str | None:
    """Bring the schema to `revision`; a no-op when it is there already. Returns the revision."""
    async with write_transaction(engine) as conn:
        if is_postgres(conn):
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATE_LOCK_ID})
        await conn.run_sync(lambda sync: command.upgrade(_config(sync), revision))
        return await conn.run_sync(_current)


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)
