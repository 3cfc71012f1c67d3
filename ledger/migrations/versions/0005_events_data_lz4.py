"""PostgreSQL: `events.data` compressed with lz4 instead of pglz (PostgreSQL 14+, where built
with it). A row over ~2 KB is compressed on insert, and most senders' payloads are bigger (a
GitHub push is often 5–50 KB): with a 9.5 KB push, PostgreSQL's CPU a delivery fell from ~360 to
~195 us and the append's time a delivery by ~30 % (bench/README.md, session 7). Only values
written from now on; older ones stay as they were and read the same. SQLite: nothing to do.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The values this server accepts (lz4 is among them only when it was built with lz4).
_LZ4_AVAILABLE = sa.text(
    "SELECT count(*) FROM pg_settings"
    " WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)"
)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or not bind.execute(_LZ4_AVAILABLE).scalar():
        return
    op.execute("ALTER TABLE events ALTER COLUMN data SET COMPRESSION lz4")


def downgrade() -> None:
    raise NotImplementedError("the log is append-only: hookledger never downgrades a schema")
