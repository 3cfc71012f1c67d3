"""The key that seals trigger and destination secrets, checked against the database at start.

Every process that shares a database must seal and open its secrets with one key (SPEC: several
`hookledger serve` processes, on one host or many, share one database). A process whose key is
another — started on a second host, or in another working directory on PostgreSQL, without
HOOKLEDGER_SECRET_KEY — could open none of them and would refuse every signed delivery with 401,
which senders that do not retry (GitHub) take as final. So each process compares its key's
fingerprint (ledger/vault.py) with the one the database holds before it serves anything, and
refuses to start when they differ (`SecretKeyMismatch`, said by the CLI as an error).

The first process to start on a database writes the fingerprint, once it has checked that its
key opens the secrets already stored, if there are any (a database from before this check).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.codec import loads
from ledger.errors import SecretKeyMismatch
from ledger.schema import secret_key_check
from ledger.store import write_transaction
from ledger.vault import Vault
from projections.triggers import table as triggers

SAMPLE = 16  # sealed secrets tried on a database with no fingerprint yet: any one opening will do


async def check_secret_key(engine: AsyncEngine, vault: Vault, source: str) -> None:
    """Raises `SecretKeyMismatch` when this database's secrets were sealed with another key;
    `source` says where this process's key came from."""
    async with write_transaction(engine) as conn:
        recorded = await _recorded(conn)
        if recorded is None:
            sealed = await _sealed(conn)
            if sealed and not any(vault.opens(ciphertext) for ciphertext in sealed):
                raise SecretKeyMismatch(source)
            insert = (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(
                secret_key_check
            )
            row = {"id": 1, "fingerprint": vault.fingerprint, "recorded_at": datetime.now(UTC)}
            await conn.execute(insert.values(**row).on_conflict_do_nothing())
            recorded = await _recorded(conn)  # another process's, when it came first
    if recorded != vault.fingerprint:
        raise SecretKeyMismatch(source)


async def _recorded(conn: AsyncConnection) -> str | None:
    query = sa.select(secret_key_check.c.fingerprint).where(secret_key_check.c.id == 1)
    return (await conn.execute(query)).scalar_one_or_none()


async def _sealed(conn: AsyncConnection) -> list[str]:
    """Up to SAMPLE secrets sealed in this database: triggers' and destinations'."""
    rows = await conn.execute(sa.select(triggers.c.secrets, triggers.c.destination))
    found = (_ciphertexts(secrets, destination) for secrets, destination in rows)
    return list(itertools.islice(itertools.chain.from_iterable(found), SAMPLE))


def _ciphertexts(secrets: str, destination: str | None) -> list[str]:
    sealed = [item["ciphertext"] for item in loads(secrets)]
    secret = loads(destination).get("secret_ciphertext") if destination else None
    return [*sealed, *([secret] if secret else [])]
