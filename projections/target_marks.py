"""Which tables a rebuild made, so that `rebuild --into` replaces those and nothing else.

A rebuild makes its `--into` table with a mark of its own (`hookledger rebuild <projection>
<uuid>`): the table's comment on PostgreSQL; on SQLite, which has no comments on tables, a
comment inside its CREATE statement, which SQLite keeps word for word in `sqlite_master.sql`.
The transaction that makes the table also records its name and mark in `rebuild_targets`. A
later rebuild into that name drops the table only when it still carries the mark its row names:
a table the user made, or made again after dropping a rebuilt one, carries none and is refused
(RebuildTargetExists), nothing changed, unless the caller asks to replace it; a view, an index or
a sequence never is. The mark and the row go with the database's backups (pg_dump keeps
comments; SQLite's text is the table's own).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateTable

from ledger.schema import rebuild_targets
from projections.errors import RebuildTargetExists

# pg_class.relkind: what a name found on PostgreSQL is. Only "r" and "p" are tables.
_PG_KINDS = {
    "r": "table",
    "p": "table",  # partitioned
    "v": "view",
    "m": "materialized view",
    "i": "index",
    "I": "index",
    "S": "sequence",
    "f": "foreign table",
    "c": "composite type",
}
# The relation the name resolves to as DROP and CREATE would resolve it (search_path), and what
# marks it. A name is plain and lower case (projections.targets.check_target): no quoting needed.
_PG_FIND = sa.text(
    "SELECT c.relkind::text, coalesce(obj_description(c.oid, 'pg_class'), '')"
    " FROM pg_class c WHERE c.oid = to_regclass(:name)"
)
# Tables, views and indexes share one namespace, whose names ignore case.
_SQLITE_FIND = sa.text(
    "SELECT type, coalesce(sql, '') FROM sqlite_master"
    " WHERE name = :name COLLATE NOCASE AND type IN ('table', 'view', 'index')"
)


@dataclass(frozen=True, slots=True)
class _Found:
    kind: str  # "table", "view", "index", …
    label: str  # its comment (PostgreSQL) or its CREATE statement (SQLite): where a mark is


async def make_target(
    conn: AsyncConnection, table: sa.Table, *, projection: str, until_seq: int, replace: bool
) -> None:
    """In the caller's transaction: make `table` anew, marked and recorded as this rebuild's.

    What holds its name already is dropped first when a rebuild made it, or when it is a table
    and `replace` is true; anything else raises RebuildTargetExists before any change.
    """
    found = await _find(conn, table.name)
    if found is not None:
        await _check_replaceable(conn, table.name, found, replace=replace)
        await conn.execute(sa.text(f'DROP TABLE "{table.name}"'))
    mark = f"hookledger rebuild {projection} {uuid.uuid4().hex}"
    await _create_marked(conn, table, mark)
    await conn.execute(sa.delete(rebuild_targets).where(rebuild_targets.c.name == table.name))
    await conn.execute(
        sa.insert(rebuild_targets).values(
            name=table.name,
            projection=projection,
            until_seq=until_seq,
            mark=mark,
            made_at=datetime.now(UTC),
        )
    )


async def _find(conn: AsyncConnection, name: str) -> _Found | None:
    if conn.dialect.name == "postgresql":
        row = (await conn.execute(_PG_FIND, {"name": name})).one_or_none()
        return None if row is None else _Found(_PG_KINDS.get(row[0], "relation"), row[1])
    row = (await conn.execute(_SQLITE_FIND, {"name": name})).first()
    return None if row is None else _Found(row[0], row[1])


async def _check_replaceable(
    conn: AsyncConnection, name: str, found: _Found, *, replace: bool
) -> None:
    if found.kind != "table":
        raise RebuildTargetExists(name, found.kind)
    if replace:
        return
    query = sa.select(rebuild_targets.c.mark).where(rebuild_targets.c.name == name)
    mark = (await conn.execute(query)).scalar_one_or_none()
    if mark is None or mark not in found.label:
        raise RebuildTargetExists(name, found.kind)


async def _create_marked(conn: AsyncConnection, table: sa.Table, mark: str) -> None:
    """CREATE TABLE without IF NOT EXISTS: a table of that name made since `_find` looked (by
    another session on PostgreSQL) makes it fail, never lets it be taken for this one."""
    ddl = str(CreateTable(table).compile(dialect=conn.dialect)).strip()
    if conn.dialect.name == "sqlite":
        # The first "(" opens the column list: a name is plain (check_target).
        await conn.exec_driver_sql(ddl.replace("(", f"( /* {mark} */", 1))
    else:
        await conn.exec_driver_sql(ddl)
        # The mark is [a-z0-9_ ] only; a utility statement takes no bind parameters.
        await conn.exec_driver_sql(f"COMMENT ON TABLE \"{table.name}\" IS '{mark}'")
    for index in table.indexes:
        await conn.run_sync(index.create)
