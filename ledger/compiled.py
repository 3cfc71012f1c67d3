"""A statement compiled once for the driver's cursor (ledger.rows runs them): its SQL, its binds in
positional order with their types' bind processors, its result columns and their types, and the
tables it reads or writes; rows' values converted through those processors (each distinct value
once per call); and SQL run on the driver's own cursor, its errors raised as SQLAlchemy's
(`IntegrityError`, `OperationalError`, with `connection_invalidated`), as from `conn.execute`.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
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


def _memo(seen: dict[Any, Any], key: Any, value: Any, processor: Processor) -> Any:
    """`processor(value)`, converted once for each `key` in `seen`."""
    found = seen.get(key, seen)
    if found is seen:
        found = seen[key] = processor(value)
    return found


# Set on a connection while its writes must all go as one statement, its own transaction
# (ledger.deferred `alone`): any statement sent before that one raises `NotAlone` unsent.
ALONE = "hookledger_alone"


class NotAlone(Exception):  # noqa: N818 - a signal, not a failure
    """A statement was about to be sent before the one that must carry all of a transaction's
    writes (`ALONE`): nothing was sent."""


def _on_cursor(conn: sa.Connection, sql: str, params: Any, call: Callable[[Any], T]) -> T:
    if ALONE in conn.info:
        raise NotAlone(sql)
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


_PARAMETER = re.compile(r"\$(\d+)")
