"""trigger_stats: per trigger and UTC day counts and a latency histogram.

The table starts empty with no checkpoint: the projector folds the whole log into it on its next
start, as it does for any new projection. Nothing stored before is touched.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
COUNTERS = (
    "received",
    "duplicates",
    "duplicates_body_mismatch",
    "filtered",
    "succeeded",
    "failed_transient",
    "failed_permanent",
    "dead_lettered",
    "replays",
)


def upgrade() -> None:
    op.create_table(
        "trigger_stats",
        sa.Column("trigger_id", sa.String(64), nullable=False),
        sa.Column("day", sa.Date, nullable=False),
        *(sa.Column(name, sa.Integer, nullable=False) for name in COUNTERS),
        sa.Column("latency_count", sa.Integer, nullable=False),
        sa.Column("latency_sum_ms", sa.Float, nullable=False),
        sa.Column("latency_histogram", sa.Text, nullable=False),
        sa.Column("last_seq", BigInt, nullable=False),
        sa.PrimaryKeyConstraint("trigger_id", "day", name="pk_trigger_stats"),
    )
    op.create_index("ix_trigger_stats_day", "trigger_stats", ["day"])


def downgrade() -> None:
    raise NotImplementedError("the log is append-only: hookledger never downgrades a schema")
