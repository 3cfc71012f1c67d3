"""Many rows into one table, cheaply: the statement compiled once, values through the columns'
own bind processors, each distinct value converted once per call.

SQLAlchemy's executemany sends every value of every row through its compiler and processors
(~60 us a row of trigger_executions, mostly on NULLs; the datetime processors alone were a fifth
of an append). Same statement, same conversions, a fraction of the cost: the append, the
projections and rebuilds all insert through here, so what they store is what SQLAlchemy would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

Processor = Callable[[Any], Any]
T = TypeVar("T")
_Pairs = Sequence[tuple[str, Processor | None]]  # column name, bind processor


def insert_many(conn: sa.Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
    prepared = _prepared_insert(table, conn.dialect)
    if prepared is None:  # a named paramstyle: let SQLAlchemy bind
        conn.execute(table.insert(), list(rows))
        return
    sql, pairs = prepared
    converted: dict[tuple[int, Any], Any] = {}  # a batch shares its timestamps: convert each once
    conn.exec_driver_sql(sql, [_processed(row, pairs, converted) for row in rows])


@functools.lru_cache(maxsize=64)
def _prepared_insert(table: sa.Table, dialect: Dialect) -> tuple[str, _Pairs] | None:
    compiled = table.insert().compile(dialect=dialect)
    if compiled.positiontup is None:
        return None
    columns = [table.c[name] for name in compiled.positiontup]
    pairs = [(c.name, c.type.dialect_impl(dialect).bind_processor(dialect)) for c in columns]
    return str(compiled), pairs


def _processed(
    row: Mapping[str, Any], pairs: _Pairs, converted: dict[tuple[int, Any], Any]
) -> tuple[Any, ...]:
    values = []
    for position, (name, processor) in enumerate(pairs):
        value = row.get(name)
        if value is not None and processor is not None:
            key = (position, value)
            found = converted.get(key, converted)
            if found is converted:
                found = converted[key] = processor(value)
            value = found
        values.append(value)
    return tuple(values)


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
    """The parameters of `in_list(name, len(values))`."""
    return {f"{name}_{i}": value for i, value in enumerate(values)}
