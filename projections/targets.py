"""The table a rebuild fills: which names it may take.

A rebuild drops and recreates its target, so a name is checked before anything is touched: never
one of hookledger's own tables (the log, the checkpoints, the projections, Alembic's), never a
scratch table, never anything but a plain lower-case identifier.
"""

from __future__ import annotations

import re

from ledger.schema import metadata
from projections.errors import InvalidRebuildTarget
from projections.registry import PROJECTIONS

SCRATCH_SUFFIX = "__rebuild"  # `{projection}__rebuild`: the table a swapping rebuild fills
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SYSTEM_PREFIXES = ("sqlite_", "pg_")  # the databases' own namespaces


def scratch_table(projection: str) -> str:
    return projection + SCRATCH_SUFFIX


def own_tables() -> frozenset[str]:
    """Every table hookledger keeps: the ledger's and the projections' (one MetaData; the
    registry has imported every projection module), and Alembic's."""
    return (
        frozenset(metadata.tables)
        | {p.table.name for p in PROJECTIONS.values()}
        | {"alembic_version"}
    )


def check_target(table: str) -> None:
    """Raise InvalidRebuildTarget unless a rebuild may drop and fill `table`."""
    if not _PLAIN_NAME.fullmatch(table):
        raise InvalidRebuildTarget(
            table, "give a plain table name: a-z, 0-9 and _, not starting with a digit, ≤ 63"
        )
    if table in own_tables():
        raise InvalidRebuildTarget(table, "it is one of hookledger's own tables")
    if table.endswith(SCRATCH_SUFFIX) or table.startswith(_SYSTEM_PREFIXES):
        raise InvalidRebuildTarget(table, "the name is reserved")
