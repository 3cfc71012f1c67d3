"""triggers.rate_limit: a trigger's ingestion limit ({per_s, burst} as JSON), NULL for none.

Triggers registered before have no limit, which is what NULL says: nothing to backfill.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("triggers", sa.Column("rate_limit", sa.Text, nullable=True))


def downgrade() -> None:
    raise NotImplementedError("the log is append-only: hookledger never downgrades a schema")
