"""trigger_executions(trigger_id, status): the dispatcher finds a deleted trigger's waiting
executions without walking every execution that trigger ever had (server/due.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_trigger_executions_trigger_id_status", "trigger_executions", ["trigger_id", "status"]
    )


def downgrade() -> None:
    raise NotImplementedError("the log is append-only: hookledger never downgrades a schema")
