"""secret_key_check: which key seals this database's secrets (ledger/vault.py `fingerprint`).

Empty after the upgrade: the first process to start on the database writes its key's
fingerprint, after checking that the key opens the secrets already stored, if any
(server/secretkey.py). Nothing stored before is touched.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from ledger.schema import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "secret_key_check",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("recorded_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("the log is append-only: hookledger never downgrades a schema")
