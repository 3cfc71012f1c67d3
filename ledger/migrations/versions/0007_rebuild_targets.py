"""rebuild_targets: the tables `hookledger rebuild --into` made, so a rebuild replaces only those.

Empty after the upgrade: a table an earlier `--into` made is not recognised (nothing tells it from
a table of the user's), so a rebuild into it is refused until asked with `--replace` once.
Nothing stored before is touched.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from ledger.schema import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "rebuild_targets",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("projection", sa.String(64), nullable=False),
        sa.Column("until_seq", BigInt, nullable=False),
        sa.Column("mark", sa.String(128), nullable=False),
        sa.Column("made_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_rebuild_targets"),
    )


def downgrade() -> None:
    raise NotImplementedError("the log is append-only: hookledger never downgrades a schema")
