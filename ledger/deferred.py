"""PostgreSQL: a transaction's writes that wait and go with its next statement (`defer_writes`).

Each statement is a round trip there, resumed only when the busy loop gets to it, and an append
batch's writes then take two instead of four. ledger.rows hands its writes here (`_write`), and
its reads take what waits along when they may (`_with_deferred`). A connection in autocommit may
also send all its writes as one statement, its own transaction (`alone`, `send_alone`): an
append batch in one round trip, COMMIT included.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ledger.compiled import _PARAMETER, ALONE, NotAlone, _Compiled, _on_cursor

# PostgreSQL: in a transaction that defers its writes (`defer_writes`), a write that returns
# nothing waits on the connection and goes with the next statement, as a data-modifying WITH
# query of it: the append's rows with the checkpoints' check, a fold's rows of two tables in one
# round trip instead of one each. Each table's writes stay in their order (a second write to a
# table sends the first), and a statement goes with what waits only when it touches none of its
# tables (they run on one snapshot: it would not see them); else what waits goes first, alone.
_DEFERRED = "hookledger_deferred_writes"
_DISJOINT = "hookledger_disjoint_writes"


@dataclass(frozen=True, slots=True)
class _Waiting:
    compiled: _Compiled
    values: Sequence[Any]
    expected: tuple[int, str] | None = None  # rows it must return, and what it means (`alone`)
    group: object | None = None  # made within `disjoint_writes` (that call's own token)


@contextlib.contextmanager
def disjoint_writes(conn: sa.Connection) -> Iterator[None]:
    """Within: writes that never touch a row another of them touches, so that they may wait
    and go in one statement though they write one table (the same snapshot for all: none has to
    see another's rows). A projection's increments and its other rows, each key in one."""
    outer = conn.info.get(_DISJOINT)
    conn.info[_DISJOINT] = object()
    try:
        yield
    finally:
        if conn.invalidated:
            pass  # gone with its connection (asking would raise)
        elif outer is None:
            del conn.info[_DISJOINT]
        else:
            conn.info[_DISJOINT] = outer


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
    conn.info.pop(ALONE, None)


def alone(conn: sa.Connection) -> None:
    """PostgreSQL, a connection in autocommit: every write waits, and all go as one statement,
    which PostgreSQL runs as its own transaction (`send_alone`): a batch in one round trip. Any
    other statement before it (a read, a write that cannot wait) raises ledger.compiled
    `NotAlone` unsent, and so does a second write to a table (each table's writes keep their
    order, which one statement could not)."""
    conn.info[_DEFERRED] = []
    conn.info[ALONE] = True


def is_alone(conn: sa.Connection) -> bool:
    """Whether this connection's writes must all go as one statement (`alone`)."""
    return ALONE in conn.info


def expect_rows(
    conn: sa.Connection, compiled: _Compiled, values: Sequence[Any], rows: int, what: str
) -> None:
    """In a connection `alone`: a write with RETURNING that must return `rows` rows, else the
    statement sent fails whole (`hookledger_expect_rows`, migration 0008), saying `what`."""
    assert compiled.columns, "a write whose rows are counted returns them"
    _write(conn, compiled, values, (rows, what))


def send_alone(conn: sa.Connection, first: str) -> None:
    """Send all that waits in a connection `alone` as one statement: `first` (a call, such as
    taking a lock), then each expected count checked, then the writes; the same order as they
    run, all in a SELECT evaluated before the writes, which PostgreSQL runs after the query.
    Then write at once again."""
    waiting: list[_Waiting] = conn.info.pop(_DEFERRED)
    del conn.info[ALONE]
    if not waiting:
        return
    sql = _alone_sql(tuple((w.compiled, w.expected is not None) for w in waiting), first)
    values = [value for w in waiting for value in w.values]
    values += [value for w in waiting if w.expected is not None for value in w.expected]
    _on_cursor(conn, sql, values, lambda cursor: cursor.execute(sql, values))


def flush(conn: sa.Connection) -> None:
    """Send the writes that wait (one statement), and raise what they raise."""
    waiting: list[_Waiting] | None = conn.info.get(_DEFERRED)
    if not waiting:
        return
    if ALONE in conn.info:
        raise NotAlone("the writes that wait, before the statement that carries them all")
    *ahead, last = waiting
    waiting.clear()
    sql, values = _joined(ahead, last.compiled, last.values)
    _on_cursor(conn, sql, values, lambda cursor: cursor.execute(sql, values))


def discard(conn: sa.Connection) -> None:
    """Drop the writes that wait (a rollback to a savepoint taken before them is coming)."""
    waiting: list[_Waiting] | None = conn.info.get(_DEFERRED)
    if waiting:
        waiting.clear()


def _write(
    conn: sa.Connection,
    compiled: _Compiled,
    values: Sequence[Any],
    expected: tuple[int, str] | None = None,
) -> None:
    waiting: list[_Waiting] | None = conn.info.get(_DEFERRED)
    if waiting is None or compiled.tables is None or len(compiled.tables) != 1:
        flush(conn)
        _on_cursor(conn, compiled.sql, values, lambda cursor: cursor.execute(compiled.sql, values))
        return
    group = conn.info.get(_DISJOINT)
    if any(
        w.compiled.tables == compiled.tables and (group is None or w.group is not group)
        for w in waiting
    ):
        flush(conn)  # that table's earlier write first (`alone`: NotAlone)
    waiting.append(_Waiting(compiled, values, expected, group))


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


@functools.lru_cache(maxsize=64)
def _alone_sql(waiting: tuple[tuple[_Compiled, bool], ...], first: str) -> str:
    """`WITH _w0 AS (…), … SELECT first, hookledger_expect_rows((SELECT count(*) FROM _wN), $i,
    $j), …`, each expectation's rows and words bound after the writes' values: the SELECT's list
    is evaluated in its order before PostgreSQL runs the writes its WITH holds and the query did
    not read (so `first` precedes them all: tested, tests/test_alone.py)."""
    parts, checks, offset = [], [first], 0
    for n, (compiled, _) in enumerate(waiting):
        parts.append(f"_w{n} AS ({_shifted(compiled.sql, offset)})")
        offset += len(compiled.names)
    for n, (_, expected) in enumerate(waiting):
        if expected:
            counted = f"(SELECT count(*) FROM _w{n})"  # noqa: S608 - our own names
            checks.append(f"hookledger_expect_rows({counted}, ${offset + 1}, ${offset + 2})")
            offset += 2
    return f"WITH {', '.join(parts)} SELECT {', '.join(checks)}"
