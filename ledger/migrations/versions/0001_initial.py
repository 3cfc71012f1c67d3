"""The log, projection checkpoints, triggers and trigger_executions.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from ledger.schema import POSTGRES_APPEND_ONLY, SQLITE_APPEND_ONLY, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _events() -> None:
    op.create_table(
        "events",
        sa.Column("seq", BigInt, primary_key=True, autoincrement=False),
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("stream", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("trigger_id", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("meta", sa.Text, nullable=False),
        sa.Column("recorded_at", UTCDateTime, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_events"),
        sa.UniqueConstraint("id", name="uq_events_id"),
        sa.UniqueConstraint("stream", "version", name="uq_events_stream_version"),
    )
    where = sa.text("type = 'webhook.received'")
    op.create_index(
        "uq_events_trigger_id_idempotency_key",
        "events",
        ["trigger_id", "idempotency_key"],
        unique=True,
        sqlite_where=where,
        postgresql_where=where,
    )
    op.create_index("ix_events_trigger_id_seq", "events", ["trigger_id", "seq"])
    op.create_index("ix_events_type_seq", "events", ["type", "seq"])
    statements = (
        POSTGRES_APPEND_ONLY if op.get_bind().dialect.name == "postgresql" else SQLITE_APPEND_ONLY
    )
    for statement in statements:
        op.execute(statement)


def _checkpoints() -> None:
    op.create_table(
        "projection_checkpoints",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("seq", BigInt, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_projection_checkpoints"),
    )


def _triggers() -> None:
    op.create_table(
        "triggers",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("secrets", sa.Text, nullable=False),
        sa.Column("destination", sa.Text),
        sa.Column("idempotency_key_path", sa.String(255)),
        sa.Column("filter", sa.Text),
        sa.Column("retry", sa.Text),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("last_seq", BigInt, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_triggers"),
    )


def _trigger_executions() -> None:
    op.create_table(
        "trigger_executions",
        sa.Column("execution_id", sa.String(36), nullable=False),
        sa.Column("trigger_id", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("received_event_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error_category", sa.String(16)),
        sa.Column("last_error", sa.Text),
        sa.Column("last_status_code", sa.Integer),
        sa.Column("next_attempt_at", UTCDateTime),
        sa.Column("lease_until", UTCDateTime),
        sa.Column("duplicate_count", sa.Integer, nullable=False),
        sa.Column("last_duplicate_at", UTCDateTime),
        sa.Column("replay_count", sa.Integer, nullable=False),
        sa.Column("last_replay_at", UTCDateTime),
        sa.Column("received_at", UTCDateTime, nullable=False),
        sa.Column("completed_at", UTCDateTime),
        sa.Column("last_seq", BigInt, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("execution_id", name="pk_trigger_executions"),
    )
    op.create_index(
        "ix_trigger_executions_trigger_id_execution_id",
        "trigger_executions",
        ["trigger_id", "execution_id"],
    )
    op.create_index(
        "ix_trigger_executions_status_next_attempt_at",
        "trigger_executions",
        ["status", "next_attempt_at"],
    )


def upgrade() -> None:
    _events()
    _checkpoints()
    _triggers()
    _trigger_executions()


def downgrade() -> None:
    raise NotImplementedError("the log is append-only: hookledger never downgrades a schema")
