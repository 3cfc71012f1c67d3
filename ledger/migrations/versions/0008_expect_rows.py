"""PostgreSQL: `hookledger_expect_rows(actual, expected, what)`, which fails the statement it is
in unless `actual = expected`. An append batch sent as one statement, its own transaction
(ledger/append.py `_append_alone`), checks with it that the inline fold's checkpoints all moved:
otherwise nothing of the statement is written, and the batch is appended in a transaction of its
own as before. SQLite: nothing to do.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from alembic import op

from ledger.schema import POSTGRES_EXPECT_ROWS

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(POSTGRES_EXPECT_ROWS)


def downgrade() -> None:
    raise NotImplementedError("the log is append-only: hookledger never downgrades a schema")
