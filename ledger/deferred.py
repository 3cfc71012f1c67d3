"""PostgreSQL: a transaction's writes that wait and go with its next statement (`defer_writes`).

Each statement is a round trip there, resumed only when the busy loop gets to it, and an append
batch's writes then take two instead of four. ledger.rows hands its writes here (`_write`), and
its reads take what waits along when they may (`_with_deferred`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ledger.compiled import _PARAMETER, _Compiled, _on_cursor

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
