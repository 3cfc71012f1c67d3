"""The hot path's statements, cheaply: each compiled once, then run on the driver's own cursor,
values through the columns' own bind processors (each distinct value converted once per call)
and results through their result processors.

SQLAlchemy's execute costs ~50 us a statement here before the database does anything (execution
context, events, result metadata), and its executemany sends every value of every row through
the compiler (~60 us a row of trigger_executions, mostly on NULLs). An append batch runs ~10
statements, so for one delivery that overhead was most of its transaction. The statements are
still SQLAlchemy's, compiled by its dialect, and the values converted by its types: what is
stored and read back is what SQLAlchemy would store and read. Driver errors become SQLAlchemy's
(`IntegrityError`, `OperationalError`, with `connection_invalidated`), as from `conn.execute`.

The compiling, the values' conversion and the cursor are ledger.compiled's. On PostgreSQL a
transaction may also let its writes wait and go with its next statement (ledger.deferred): each
statement is a round trip there, and an append batch's writes then take two instead of four.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from ledger.compiled import _Compiled, _compiled, _on_cursor, _result_processors, _values
from ledger.deferred import _with_deferred, _write, expect_rows, flush

T = TypeVar("T")


def insert_many(conn: sa.Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT `rows` (dicts by column name) into `table`.

    On PostgreSQL, rows alike (the same columns) go as one statement, `INSERT … SELECT … FROM
    unnest($1::type[], …)`, a column an array: an executemany is one execution a row, and
    PostgreSQL starts and ends its executor for each (a fifth of its CPU in an append batch).
    """
    if conn.dialect.name == "postgresql" and len(rows) > 1:
        columns = rows[0].keys()
        if all(row.keys() == columns for row in rows):
            _insert_arrays(conn, table, tuple(columns), rows)
            return
    execute_many(conn, _insert_statement(table), rows)


def _insert_arrays(
    conn: sa.Connection, table: sa.Table, names: tuple[str, ...], rows: Sequence[Mapping[str, Any]]
) -> None:
    shared, params = unnest_params(rows)
    compiled = _compiled(_unnest_insert(table, names, shared), conn.dialect, "")
    assert compiled is not None  # PostgreSQL's paramstyle is positional
    _write(conn, compiled, _values([params], compiled)[0])


def unnest_params(rows: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Rows alike (not empty) as the one row of parameters of a statement over `unnest_columns`:
    each column's values as an array, but a shared column's (`shared_columns`) one value; and
    which columns are shared (the statement's shape)."""
    arrays = as_arrays(rows)
    shared = shared_columns(arrays)
    return shared, {name: v[0] if name in shared else v for name, v in arrays.items()}


def shared_columns(arrays: Mapping[str, list[Any]]) -> tuple[str, ...]:
    """The columns of `as_arrays` whose every row holds one value (a batch's trigger, its time,
    a new execution's zeros and NULLs), bound once instead of as an array: asyncpg checks each
    element of an array against two abstract base classes in Python (~0.2 us a check here), and
    PostgreSQL receives and unnests each. One column at least stays an array: the arrays give
    the rows their count. Equal is `==` (C's `list.count`): equal values of a column's type are
    one stored value (1 and True in an integer column; no column here is a NUMERIC, whose 1 and
    1.0 differ)."""
    shared = tuple(
        name
        for name, values in arrays.items()
        # the last value first: a column that differs mostly differs there (a rebuild's 5,000
        # rows are not scanned for it)
        if values[-1] == values[0] and values.count(values[0]) == len(values)
    )
    return shared[1:] if len(shared) == len(arrays) else shared


def as_arrays(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows alike (not empty) as one row of arrays, a column's values each: the parameters of a
    statement over `unnest` of them (PostgreSQL)."""
    return {name: [row[name] for row in rows] for name in rows[0]}


def execute_many(
    conn: sa.Connection,
    statement: sa.Executable,
    rows: Sequence[Mapping[str, Any]],
    *,
    prefix: str = "",
) -> None:
    """`statement` once per row; a row's keys are the statement's bind names less `prefix`."""
    if not rows:
        return
    compiled = _compiled(statement, conn.dialect, prefix)
    if compiled is None:  # a named paramstyle: let SQLAlchemy bind
        conn.execute(statement, [{f"{prefix}{k}": v for k, v in row.items()} for row in rows])
        return
    values = _values(rows, compiled)
    if len(values) == 1:
        _write(conn, compiled, values[0])
        return
    flush(conn)  # what waits goes first
    _on_cursor(conn, compiled.sql, values, lambda cursor: cursor.executemany(compiled.sql, values))


def fetch_all(
    conn: sa.Connection, statement: sa.Executable, params: Mapping[str, Any] | None = None
) -> list[Sequence[Any]]:
    """The rows of a SELECT (tuples in its columns' order), converted as SQLAlchemy would."""
    compiled = _compiled(statement, conn.dialect, "")
    if compiled is None:
        return list(conn.execute(statement, dict(params or {})).all())
    return _fetch(conn, compiled, params)


def fetch_dicts(
    conn: sa.Connection, statement: sa.Executable, params: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """`fetch_all`, each row a dict by column name."""
    compiled = _compiled(statement, conn.dialect, "")
    if compiled is None:
        return [dict(row) for row in conn.execute(statement, dict(params or {})).mappings()]
    names = compiled.columns
    return [dict(zip(names, row, strict=True)) for row in _fetch(conn, compiled, params)]


def _fetch(
    conn: sa.Connection, compiled: _Compiled, params: Mapping[str, Any] | None
) -> list[Sequence[Any]]:
    sql, values = _with_deferred(conn, compiled, _values([params or {}], compiled)[0])

    def run(cursor: Any) -> tuple[list[Sequence[Any]], tuple[Any, ...]]:
        cursor.execute(sql, values)
        # The driver's type of each column: some processors depend on it (asyncpg's numerics).
        return list(cursor.fetchall()), tuple(column[1] for column in cursor.description or ())

    rows, coltypes = _on_cursor(conn, sql, values, run)
    processors = _result_processors(compiled, conn.dialect, coltypes)
    if not processors:
        return rows
    converted: list[Sequence[Any]] = []
    for row in rows:
        listed = list(row)
        for position, processor in processors:
            listed[position] = processor(listed[position])
        converted.append(tuple(listed))
    return converted


def write_expecting(
    conn: sa.Connection,
    statement: sa.Executable,
    params: Mapping[str, Any],
    rows: int,
    what: str,
) -> None:
    """A write with RETURNING in a connection whose writes go as one statement (ledger.deferred
    `alone`): that statement fails whole unless it returns `rows` rows (`what` says why)."""
    compiled = _compiled(statement, conn.dialect, "")
    assert compiled is not None  # PostgreSQL's paramstyle is positional
    expect_rows(conn, compiled, _values([params], compiled)[0], rows, what)


def execute_sql(conn: sa.Connection, sql: str) -> None:
    """A statement without parameters or rows (SAVEPOINT …), on the driver's cursor."""
    flush(conn)
    _on_cursor(conn, sql, (), lambda cursor: cursor.execute(sql))


@functools.lru_cache(maxsize=64)
def _insert_statement(table: sa.Table) -> sa.Insert:
    return table.insert()


def cast_type(type_: Any) -> Any:
    """`type_` for a bind's cast, without a string's length: an explicit cast to `varchar(n)`
    cuts a longer value short, where the column's own assignment refuses it (as a row inserted
    alone would be refused)."""
    if isinstance(type_, sa.String) and type_.length is not None:
        return type(type_)()
    return type_


def array_of(type_: Any) -> postgresql.ARRAY[Any]:
    """A PostgreSQL array of `type_` for a bind's cast (`cast_type`: no string's length)."""
    return postgresql.ARRAY(cast_type(type_))


def unnest_columns(
    types: Mapping[str, Any], shared: tuple[str, ...], *, prefix: str = "", alias: str = "rows"
) -> dict[str, Any]:
    """The columns of rows given as arrays, by name: `unnest(:prefixname::type[], …) AS alias`,
    each bind a column's values as an array of its type (its bind processor converts each
    element), but a `shared` column's one value (:prefixname::type), the same in every row.
    Their parameters: `unnest_params`."""
    unnested = [name for name in types if name not in shared]
    arrays = [sa.bindparam(f"{prefix}{name}", type_=array_of(types[name])) for name in unnested]
    source = sa.func.unnest(*arrays).table_valued(*unnested).render_derived(name=alias).c
    return {
        name: sa.bindparam(f"{prefix}{name}", type_=cast_type(types[name]))
        if name in shared
        else source[name]
        for name in types
    }


@functools.lru_cache(maxsize=256)
def _unnest_insert(table: sa.Table, names: tuple[str, ...], shared: tuple[str, ...]) -> sa.Insert:
    """INSERT INTO table (names) SELECT … FROM unnest(…): the rows of `unnest_columns`."""
    columns = unnest_columns({name: table.c[name].type for name in names}, shared)
    return table.insert().from_select(list(names), sa.select(*columns.values()))


def padded(values: Sequence[T], filler: T | None = None) -> list[T]:
    """`values` (not empty) up to the next power of two: its last value repeated, or `filler`.

    An IN list of bind parameters is a new statement for each length, and SQLAlchemy's
    "expanding" parameters rewrite the SQL at every execution (~0.4 ms here, for each of the
    ~8 IN lists of an append). With lengths in powers of two, each statement is built and
    compiled once per size class and then only executed; a repeated value changes no IN. A
    statement with a branch per value (a UNION ALL) runs each branch: it pads with a value
    that its branch finds nothing for at once.
    """
    size = 1
    while size < len(values):
        size *= 2
    fill = values[-1] if filler is None else filler
    return [*values, *[fill] * (size - len(values))]


def in_list(column: sa.ColumnElement[Any], name: str, size: int) -> list[sa.BindParameter[Any]]:
    """`size` bind parameters named `name_0` … for an IN list on `column` (see `padded`)."""
    return [sa.bindparam(f"{name}_{i}", type_=column.type) for i in range(size)]


def in_values(name: str, values: Sequence[Any]) -> dict[str, Any]:
    """The parameters of `in_list(column, name, len(values))`."""
    return {f"{name}_{i}": value for i, value in enumerate(values)}
