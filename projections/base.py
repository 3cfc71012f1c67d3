"""What a projection is to the runner: a named read table and how a batch of events changes it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Protocol

import sqlalchemy as sa

from ledger.deferred import disjoint_writes
from ledger.events import RecordedEvent
from ledger.rows import (
    execute_many,
    fetch_dicts,
    in_list,
    in_values,
    insert_many,
    padded,
    unnest_columns,
    unnest_params,
)
from ledger.schema import events

Row = dict[str, Any]
# SQLite binds at most 32766 parameters a statement; stay well under it.
_CHUNK = 500


# The window of the log a bulk fold's statements run on: seq in (:after, :until].
IN_WINDOW = sa.and_(events.c.seq > sa.bindparam("after"), events.c.seq <= sa.bindparam("until"))


@dataclass(frozen=True, slots=True)
class BulkFold:
    """What a rebuild may fold set-wise, one SQL statement per window of the log, instead of
    event by event in Python (projections/rebuild.py). The live runner never uses it: `evolve`
    stays the one definition of the fold, and the property test holds the two equal.

    In each window (`IN_WINDOW`) a rebuild runs `create` (rows made from the covered
    events that open a stream), then folds every event `covers` leaves out with `apply`, in seq
    order; after the last window, `amend` once over the whole log (its changes, spread over the
    table, are then each written once, not once a window). So `amend` may only change columns
    that no other event reads or writes, and `last_seq`/`version` only where its event is the
    later one: it commutes with every other event.
    """

    covers: sa.ColumnElement[bool]  # over ledger.schema.events: the events create/amend fold
    create: Callable[[sa.Table, str], sa.Executable]  # (target table, dialect name)
    amend: Callable[[sa.Table, str], sa.Executable]


@dataclass(frozen=True, slots=True)
class Increment:
    """Events whose change to a row the database can make where the row stands, unread: the
    fold of a log's bulk (a duplicate adds one to a counter) without a SELECT of the row, the
    conversion of its columns back to Python, and an UPDATE of what `evolve` recomputed.

    `apply` sends a key's events through it when every event of that key in the batch is of
    `types`: one change a key, `values(its events here, in seq order)` plus `key`, made by
    `statement(table, change)`, where `change.<name>` is each of `columns(table)` (name: type):
    a bind parameter on SQLite (the statement runs once a key), the column of an `unnest` of
    arrays on PostgreSQL (one statement for every key: one execution, and it can wait to go with
    the next statement, see ledger.rows). It must leave the row as `evolve` would, event by
    event: a missing row stays missing (evolve gives None for it), and events at or below the
    row's `last_seq` change nothing; its guard may take the key's first event here, since a
    fold never gives a row some of a batch's events and not the others (checkpoints move with
    the folds; rebuilds fill an empty table). `evolve` stays the definition; the property test
    holds the live fold (this) equal to a rebuild.
    """

    types: frozenset[str]
    columns: Callable[[sa.Table], dict[str, Any]]  # the change's columns and their types
    statement: Callable[[sa.Table, Any], sa.Executable]
    values: Callable[[list[RecordedEvent]], Row]


@functools.lru_cache(maxsize=64)
def _increment_statement(
    increment: Increment, table: sa.Table, key_column: str, dialect: str, shared: tuple[str, ...]
) -> sa.Executable:
    types = {"key": table.c[key_column].type} | increment.columns(table)
    if dialect == "postgresql":
        change: Any = SimpleNamespace(**unnest_columns(types, shared, prefix="b_", alias="change"))
    else:
        change = SimpleNamespace(
            **{name: sa.bindparam(f"b_{name}", type_=type_) for name, type_ in types.items()}
        )
    return increment.statement(table, change)


class Projection(Protocol):
    # Read-only: frozen dataclasses and plain classes both satisfy it.
    @property
    def name(self) -> str: ...

    @property
    def table(self) -> sa.Table: ...

    @property
    def bulk(self) -> BulkFold | None: ...

    def shadow_table(self, name: str) -> sa.Table: ...

    def index_ddl(self, table_name: str) -> list[sa.Index]: ...

    def apply(self, conn: sa.Connection, table: sa.Table, events: Sequence[RecordedEvent]) -> None:
        """Fold `events` into `table` (plain SQLAlchemy: async callers use `conn.run_sync`)."""
        ...


@dataclass(frozen=True, slots=True)
class RowProjection:
    """A projection with one row per key, folded by a pure `evolve(row, event) -> row`."""

    name: str
    table: sa.Table
    key_column: str
    key_of: Callable[[RecordedEvent], str | None]
    evolve: Callable[[Row | None, RecordedEvent], Row | None]
    shadow: Callable[[str], sa.Table]
    indexes: Sequence[tuple[str, list[str]]] = ()
    # One row per stream (the key names the stream): a stream's first event (version 1) comes
    # before any row of its key can exist, so its row is not looked for. Folds are exactly once
    # (checkpoints), so this holds live and in rebuilds; it spares most of a rebuild's reads.
    keyed_by_stream: bool = False
    bulk: BulkFold | None = None
    increment: Increment | None = None

    def shadow_table(self, name: str) -> sa.Table:
        return self.shadow(name)

    def index_ddl(self, table_name: str) -> list[sa.Index]:
        target = self.shadow(table_name)
        return [sa.Index(name, *(target.c[c] for c in cols)) for name, cols in self.indexes]

    def apply(self, conn: sa.Connection, table: sa.Table, events: Sequence[RecordedEvent]) -> None:
        keyed = [(key, event) for event in events if (key := self.key_of(event)) is not None]
        if not keyed:
            return
        # Each key's row is written once: by the increments (keys whose every event here is
        # one) or else with the rest, inserted or updated. So on PostgreSQL all of them may go
        # in one statement (ledger.deferred), the append's own when it goes alone.
        with disjoint_writes(conn):
            self._apply(conn, table, keyed)

    def _apply(
        self, conn: sa.Connection, table: sa.Table, keyed: list[tuple[str, RecordedEvent]]
    ) -> None:
        if self.increment is not None:
            keyed = self._increment(conn, table, keyed, self.increment)
            if not keyed:
                return
        if self.keyed_by_stream:
            first = {key for key, event in keyed if event.version == 1}
            wanted = {key for key, _ in keyed if key not in first}
        else:
            wanted = {key for key, _ in keyed}
        existing = self._load(conn, table, wanted) if wanted else {}
        rows = dict(existing)
        for key, event in keyed:
            after = self.evolve(rows.get(key), event)
            if after is not None:
                rows[key] = after
        self._store(conn, table, rows, existing)

    def _increment(
        self,
        conn: sa.Connection,
        table: sa.Table,
        keyed: list[tuple[str, RecordedEvent]],
        increment: Increment,
    ) -> list[tuple[str, RecordedEvent]]:
        """Fold the keys whose every event here is an increment; the rest is left to evolve."""
        types = increment.types
        other = {key for key, event in keyed if event.type not in types}
        if len(other) == len({key for key, _ in keyed}):
            return keyed
        by_key: dict[str, list[RecordedEvent]] = {}
        for key, event in keyed:
            if key not in other:
                by_key.setdefault(key, []).append(event)
        changes = [{"key": key, **increment.values(events)} for key, events in by_key.items()]
        shared: tuple[str, ...] = ()
        if conn.dialect.name == "postgresql":  # one row: a column of values each
            shared, params = unnest_params(changes)
            changes = [params]
        statement = _increment_statement(
            increment, table, self.key_column, conn.dialect.name, shared
        )
        execute_many(conn, statement, changes, prefix="b_")
        return [(key, event) for key, event in keyed if key in other]

    def _load(self, conn: sa.Connection, table: sa.Table, keys: set[str]) -> dict[str, Row]:
        ordered, found = sorted(keys), {}
        for start in range(0, len(ordered), _CHUNK):
            chunk = padded(ordered[start : start + _CHUNK])
            query = _load_statement(table, self.key_column, len(chunk))
            for row in fetch_dicts(conn, query, in_values("key", chunk)):
                found[row[self.key_column]] = row
        return found

    def _store(
        self, conn: sa.Connection, table: sa.Table, rows: dict[str, Row], existing: dict[str, Row]
    ) -> None:
        inserts = [row for key, row in rows.items() if key not in existing]
        if inserts:
            insert_many(conn, table, inserts)
        # An UPDATE sets only the columns that changed: SQLite rewrites the entries of every
        # index on a column in SET, changed or not, and a duplicate changes no indexed column.
        # Rows are grouped by what changed, one executemany each.
        updates: dict[tuple[str, ...], list[Row]] = {}
        for key, row in rows.items():
            before = existing.get(key)
            if before is None:
                continue
            changed = tuple(name for name, value in row.items() if before.get(name) != value)
            if changed:
                updates.setdefault(changed, []).append(row)
        for changed, group in updates.items():
            statement = _update_statement(table, self.key_column, changed)
            values = [{name: row[name] for name in (self.key_column, *changed)} for row in group]
            execute_many(conn, statement, values, prefix="b_")


@functools.lru_cache(maxsize=128)
def _load_statement(table: sa.Table, key_column: str, size: int) -> sa.Select[Any]:
    return sa.select(table).where(
        table.c[key_column].in_(in_list(table.c[key_column], "key", size))
    )


@functools.lru_cache(maxsize=256)
def _update_statement(table: sa.Table, key_column: str, columns: tuple[str, ...]) -> sa.Update:
    values: dict[str, Any] = {name: sa.bindparam(f"b_{name}") for name in columns}
    return (
        table.update().where(table.c[key_column] == sa.bindparam(f"b_{key_column}")).values(values)
    )
