"""Many rows into one table, cheaply: the statement compiled once, values through the columns'
own bind processors, each distinct value converted once per call.

SQLAlchemy's executemany sends every value of every row through its compiler and processors
(~60 us a row of trigger_executions, mostly on NULLs; the datetime processors alone were a fifth
of an append). Same statement, same conversions, a fraction of the cost: the append, the
projections and rebuilds all insert through here, so what they store is what SQLAlchemy would.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

Processor = Callable[[Any], Any]
T = TypeVar("T")


def insert_many(conn: sa.Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT `rows` (dicts by column name) into `table`."""
    execute_many(conn, _insert_statement(table), rows)


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
    prepared = _prepared(statement, conn.dialect, prefix)
    if prepared is None:  # a named paramstyle: let SQLAlchemy bind
        conn.execute(statement, [{f"{prefix}{k}": v for k, v in row.items()} for row in rows])
        return
    sql, names, processors = prepared
    conn.exec_driver_sql(sql, _values(rows, names, processors))


@functools.lru_cache(maxsize=64)
def _insert_statement(table: sa.Table) -> sa.Insert:
    return table.insert()


_Prepared = tuple[str, tuple[str, ...], tuple[tuple[int, Processor], ...]]


@functools.lru_cache(maxsize=128)
def _prepared(statement: sa.Executable, dialect: Dialect, prefix: str) -> _Prepared | None:
    compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    if compiled.positiontup is None:
        return None
    binds = list(compiled.positiontup)
    processors = tuple(
        (position, processor)
        for position, name in enumerate(binds)
        if (processor := compiled.binds[name].type._cached_bind_processor(dialect)) is not None
    )
    names = tuple(name.removeprefix(prefix) for name in binds)
    return str(compiled), names, processors


def _values(
    rows: Sequence[Mapping[str, Any]],
    names: tuple[str, ...],
    processors: tuple[tuple[int, Processor], ...],
) -> list[Sequence[Any]]:
    take = operator.itemgetter(*names)
    single = len(names) == 1
    converted: dict[tuple[int, Any], Any] = {}  # a batch shares its timestamps: convert each once
    values: list[Sequence[Any]] = []
    for row in rows:
        try:
            picked = (take(row),) if single else take(row)
        except KeyError:  # a row without some column: NULL there
            picked = tuple(row.get(name) for name in names)
        if processors:
            listed = list(picked)
            for position, processor in processors:
                value = listed[position]
                if value is not None:
                    key = (position, value)
                    found = converted.get(key, converted)
                    if found is converted:
                        found = converted[key] = processor(value)
                    listed[position] = found
            picked = tuple(listed)
        values.append(picked)
    return values


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
