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

On PostgreSQL a transaction may also let its writes wait and go with its next statement
(`defer_writes`): each statement is a round trip there, resumed only when the busy loop gets to
it, and an append batch's writes then take two instead of four.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.util import find_tables

Processor = Callable[[Any], Any]
T = TypeVar("T")


@dataclass(frozen=True, slots=True, eq=False)  # one a statement (cached): a key by identity
class _Compiled:
    sql: str
    names: tuple[str, ...]  # bind names in the statement's positional order, less the prefix
    take: Callable[[Mapping[str, Any]], Any] | None  # itemgetter of `names` (None: no binds)
    defaults: tuple[Any, ...]  # each bind's own value (a LIMIT, a literal), when not given
    # bind processors by position; of an array's elements for an array (True)
    processors: tuple[tuple[int, Processor, bool], ...]
    columns: tuple[str, ...]  # result columns' names (SELECT)
    types: tuple[Any, ...]  # and their SQLAlchemy types
    tables: frozenset[str] | None  # the tables it reads or writes (None: not known, any)


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
    compiled = _compiled(_unnest_insert(table, names), conn.dialect, "")
    assert compiled is not None  # PostgreSQL's paramstyle is positional
    _write(conn, compiled, _values([as_arrays(rows)], compiled)[0])


def as_arrays(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows alike (not empty) as one row of arrays, a column's values each: the parameters of a
    statement over `unnest` of them (PostgreSQL)."""
    return {name: [row[name] for row in rows] for name in rows[0]}


def _memo(seen: dict[Any, Any], key: Any, value: Any, processor: Processor) -> Any:
    """`processor(value)`, converted once for each `key` in `seen`."""
    found = seen.get(key, seen)
    if found is seen:
        found = seen[key] = processor(value)
    return found


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


def execute_sql(conn: sa.Connection, sql: str) -> None:
    """A statement without parameters or rows (SAVEPOINT …), on the driver's cursor."""
    flush(conn)
    _on_cursor(conn, sql, (), lambda cursor: cursor.execute(sql))


def _on_cursor(conn: sa.Connection, sql: str, params: Any, call: Callable[[Any], T]) -> T:
    connection = conn.connection
    dbapi_connection = connection.dbapi_connection
    if dbapi_connection is None:  # invalidated by an earlier statement: the database went away
        lost = ConnectionError("the connection to the database was lost")
        raise sa.exc.InterfaceError(sql, params, lost, connection_invalidated=True)
    cursor = dbapi_connection.cursor()
    try:
        return call(cursor)
    except conn.dialect.loaded_dbapi.Error as exc:
        invalidated = conn.dialect.is_disconnect(exc, dbapi_connection, cursor)
        if invalidated:
            connection.invalidate(exc)
        raise sa.exc.DBAPIError.instance(
            sql,
            params,
            exc,
            conn.dialect.loaded_dbapi.Error,
            connection_invalidated=invalidated,
            dialect=conn.dialect,
        ) from exc
    finally:
        cursor.close()


@functools.lru_cache(maxsize=64)
def _insert_statement(table: sa.Table) -> sa.Insert:
    return table.insert()


def array_of(type_: Any) -> postgresql.ARRAY[Any]:
    """A PostgreSQL array of `type_` for a bind's cast, without a string's length: an explicit
    cast to `varchar(n)` cuts a longer value short, where the column's own assignment refuses it
    (as a row inserted alone would be refused)."""
    if isinstance(type_, sa.String) and type_.length is not None:
        type_ = type(type_)()
    return postgresql.ARRAY(type_)


@functools.lru_cache(maxsize=64)
def _unnest_insert(table: sa.Table, names: tuple[str, ...]) -> sa.Insert:
    """INSERT INTO table (names) SELECT … FROM unnest(:name::type[], …): each bind a column's
    values as an array of its type (its bind processor converts each element)."""
    arrays = [sa.bindparam(name, type_=array_of(table.c[name].type)) for name in names]
    source = sa.func.unnest(*arrays).table_valued(*names).render_derived(name="rows")
    return table.insert().from_select(list(names), sa.select(*(source.c[n] for n in names)))


@functools.lru_cache(maxsize=256)
def _compiled(statement: sa.Executable, dialect: Dialect, prefix: str) -> _Compiled | None:
    compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    if compiled.positiontup is None:
        return None
    binds = list(compiled.positiontup)
    processors = tuple(
        (position, processor, is_array)
        for position, name in enumerate(binds)
        for processor, is_array in (_bind_processor(compiled.binds[name].type, dialect),)
        if processor is not None
    )
    defaults = tuple(compiled.binds[name].effective_value for name in binds)
    columns = tuple(entry[0] for entry in compiled._result_columns)
    types = tuple(entry[3] for entry in compiled._result_columns)
    names = tuple(name.removeprefix(prefix) for name in binds)
    take = operator.itemgetter(*names) if names else None
    sql = str(compiled)
    return _Compiled(
        sql,
        names,
        take,
        defaults,
        processors,
        columns,
        types,
        _tables(statement, sql, dialect, len(binds)),
    )


def _bind_processor(type_: Any, dialect: Dialect) -> tuple[Processor | None, bool]:
    """A bind's processor; for an array its elements' (each converted once per call, as any
    value: a batch's rows share their timestamps), and True."""
    if isinstance(type_, sa.ARRAY):
        return type_.item_type._cached_bind_processor(dialect), True
    return type_._cached_bind_processor(dialect), False


def _tables(
    statement: sa.Executable, sql: str, dialect: Dialect, binds: int
) -> frozenset[str] | None:
    """The tables a statement reads or writes, when it may join a deferred write (see
    `defer_writes`): PostgreSQL's positional SQL of SQLAlchemy constructs, without a WITH of
    its own, whose parameters are exactly its binds."""
    if dialect.name != "postgresql" or not isinstance(statement, sa.sql.ClauseElement):
        return None
    if sql.lstrip().upper().startswith("WITH") or isinstance(statement, sa.TextClause):
        return None
    # Joined, its $n are renumbered as text: every $n must be one of its binds (no `$` in a
    # literal of these statements; one that had a $n past its binds would not be joined).
    numbers = {int(n) for n in _PARAMETER.findall(sql)}
    if numbers != set(range(1, binds + 1)):
        return None
    found = find_tables(statement, include_crud=True)
    return frozenset(table.name for table in found if isinstance(table, sa.Table)) or None


@functools.lru_cache(maxsize=256)
def _result_processors(
    compiled: _Compiled, dialect: Dialect, coltypes: tuple[Any, ...]
) -> tuple[tuple[int, Processor], ...]:
    return tuple(
        (position, processor)
        for position, (type_, coltype) in enumerate(zip(compiled.types, coltypes, strict=False))
        if (processor := type_._cached_result_processor(dialect, coltype)) is not None
    )


_MISSING = object()


def _values(rows: Sequence[Mapping[str, Any]], compiled: _Compiled) -> list[Sequence[Any]]:
    names, take, processors = compiled.names, compiled.take, compiled.processors
    single = len(names) == 1
    converted: dict[tuple[int, Any], Any] = {}  # a batch shares its timestamps: convert each once
    values: list[Sequence[Any]] = []
    for row in rows:
        if take is None:
            picked: Sequence[Any] = ()
        else:
            try:
                picked = (take(row),) if single else take(row)
            except KeyError:  # a row without some bind: its own value (a LIMIT), or NULL
                picked = tuple(
                    value if (value := row.get(name, _MISSING)) is not _MISSING else default
                    for name, default in zip(names, compiled.defaults, strict=True)
                )
        if processors:
            listed = list(picked)
            for position, processor, is_array in processors:
                value = listed[position]
                if value is None:
                    continue
                if is_array:
                    listed[position] = [
                        None
                        if item is None
                        else _memo(converted, (position, item), item, processor)
                        for item in value
                    ]
                else:
                    listed[position] = _memo(converted, (position, value), value, processor)
            picked = tuple(listed)
        values.append(picked)
    return values


# PostgreSQL: in a transaction that defers its writes (`defer_writes`), a write that returns
# nothing waits on the connection and goes with the next statement, as a data-modifying WITH
# query of it: the append's rows with the checkpoints' check, a fold's rows of two tables in one
# round trip instead of one each. Each table's writes stay in their order (a second write to a
# table sends the first), and a statement goes with what waits only when it touches none of its
# tables (they run on one snapshot: it would not see them); else what waits goes first, alone.
_DEFERRED = "hookledger_deferred_writes"


@dataclass(frozen=True, slots=True)
class _Waiting:
    compiled: _Compiled
    values: Sequence[Any]


def defer_writes(conn: sa.Connection) -> None:
    """Let this connection's writes wait until its next statement (PostgreSQL; until
    `stop_deferring`). Whoever turns it on sends what waits (`flush`) before a COMMIT and
    wherever a write's error must surface, and drops it (`discard`) before rolling it back."""
    if conn.dialect.name == "postgresql":
        conn.info[_DEFERRED] = []


def stop_deferring(conn: sa.Connection) -> None:
    """Write at once again; what still waits is dropped (its transaction failed)."""
    if conn.invalidated:
        return  # its connection is gone, and what waited with it (asking would raise)
    conn.info.pop(_DEFERRED, None)


def flush(conn: sa.Connection) -> None:
    """Send the writes that wait (one statement), and raise what they raise."""
    waiting: list[_Waiting] | None = conn.info.get(_DEFERRED)
    if not waiting:
        return
    *ahead, last = waiting
    waiting.clear()
    sql, values = _joined(ahead, last.compiled, last.values)
    _on_cursor(conn, sql, values, lambda cursor: cursor.execute(sql, values))


def discard(conn: sa.Connection) -> None:
    """Drop the writes that wait (a rollback to a savepoint taken before them is coming)."""
    waiting: list[_Waiting] | None = conn.info.get(_DEFERRED)
    if waiting:
        waiting.clear()


def _write(conn: sa.Connection, compiled: _Compiled, values: Sequence[Any]) -> None:
    waiting: list[_Waiting] | None = conn.info.get(_DEFERRED)
    if waiting is None or compiled.tables is None or len(compiled.tables) != 1:
        flush(conn)
        _on_cursor(conn, compiled.sql, values, lambda cursor: cursor.execute(compiled.sql, values))
        return
    if any(w.compiled.tables == compiled.tables for w in waiting):
        flush(conn)  # that table's earlier write first
    waiting.append(_Waiting(compiled, values))


def _with_deferred(
    conn: sa.Connection, compiled: _Compiled, values: Sequence[Any]
) -> tuple[str, Sequence[Any]]:
    """The SQL and values of `compiled`, with the writes that wait when it may carry them."""
    waiting: list[_Waiting] | None = conn.info.get(_DEFERRED)
    if not waiting:
        return compiled.sql, values
    tables = compiled.tables
    if tables is None or any(tables & (w.compiled.tables or tables) for w in waiting):
        flush(conn)
        return compiled.sql, values
    ahead = list(waiting)
    waiting.clear()
    return _joined(ahead, compiled, values)


def _joined(
    ahead: Sequence[_Waiting], compiled: _Compiled, values: Sequence[Any]
) -> tuple[str, Sequence[Any]]:
    if not ahead:
        return compiled.sql, values
    sql = _joined_sql(tuple(w.compiled for w in ahead), compiled)
    return sql, [value for w in ahead for value in w.values] + list(values)


_PARAMETER = re.compile(r"\$(\d+)")


@functools.lru_cache(maxsize=64)
def _joined_sql(ahead: tuple[_Compiled, ...], last: _Compiled) -> str:
    """`WITH _w0 AS (…), … last`, each statement's $n moved past those before it."""
    parts, offset = [], 0
    for n, compiled in enumerate(ahead):
        parts.append(f"_w{n} AS ({_shifted(compiled.sql, offset)})")
        offset += len(compiled.names)
    return f"WITH {', '.join(parts)} {_shifted(last.sql, offset)}"


def _shifted(sql: str, offset: int) -> str:
    return _PARAMETER.sub(lambda m: f"${int(m.group(1)) + offset}", sql) if offset else sql


def padded(values: Sequence[T]) -> list[T]:
    """`values` (not empty) repeated at the end up to the next power of two.

    An IN list of bind parameters is a new statement for each length, and SQLAlchemy's
    "expanding" parameters rewrite the SQL at every execution (~0.4 ms here, for each of the
    ~8 IN lists of an append). With lengths in powers of two, each statement is built and
    compiled once per size class and then only executed; a repeated value changes no IN.
    """
    size = 1
    while size < len(values):
        size *= 2
    return [*values, *[values[-1]] * (size - len(values))]


def in_list(column: sa.ColumnElement[Any], name: str, size: int) -> list[sa.BindParameter[Any]]:
    """`size` bind parameters named `name_0` … for an IN list on `column` (see `padded`)."""
    return [sa.bindparam(f"{name}_{i}", type_=column.type) for i in range(size)]


def in_values(name: str, values: Sequence[Any]) -> dict[str, Any]:
    """The parameters of `in_list(column, name, len(values))`."""
    return {f"{name}_{i}": value for i, value in enumerate(values)}
