"""ledger/rows.py runs the hot path's statements on the driver's cursor: what it stores and reads
must be what SQLAlchemy itself would, and a driver's error must reach callers as SQLAlchemy's
(the appender tells an idempotency race, an outage and a bug apart by those types)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.deferred import defer_writes, discard, disjoint_writes, flush, stop_deferring
from ledger.rows import (
    execute_many,
    execute_sql,
    fetch_all,
    fetch_dicts,
    insert_many,
    shared_columns,
)
from ledger.schema import projection_checkpoints as checkpoints
from ledger.store import create_engine
from projections.trigger_stats import COUNTERS, DayStats
from projections.trigger_stats import table as stats

MOMENT = datetime(2026, 11, 28, 17, 30, 0, 123456, tzinfo=UTC)


async def _sync(engine: AsyncEngine, work: Any) -> Any:
    async with engine.begin() as conn:
        return await conn.run_sync(work)


async def test_rows_read_back_as_sqlalchemy_reads_them(engine: AsyncEngine) -> None:
    rows = [
        {"name": f"p{i}", "seq": 2**40 + i, "updated_at": MOMENT + timedelta(hours=i)}
        for i in range(3)
    ]
    await _sync(engine, lambda conn: insert_many(conn, checkpoints, rows))
    ordered = sa.select(checkpoints).order_by(checkpoints.c.name)

    def both(conn: sa.Connection) -> tuple[Any, ...]:
        plain = [tuple(row) for row in conn.execute(ordered).all()]
        mapped = [dict(row) for row in conn.execute(ordered).mappings()]
        return plain, mapped, fetch_all(conn, ordered), fetch_dicts(conn, ordered)

    plain, mapped, fetched, dicts = await _sync(engine, both)
    assert fetched == plain == [(r["name"], r["seq"], r["updated_at"]) for r in rows]
    assert dicts == mapped == rows
    assert all(row[2].tzinfo is not None for row in fetched)  # UTCDateTime's own processing


async def test_a_statements_own_values_apply_when_not_given(engine: AsyncEngine) -> None:
    rows = [{"name": f"p{i}", "seq": i, "updated_at": MOMENT} for i in range(5)]
    await _sync(engine, lambda conn: insert_many(conn, checkpoints, rows))
    first_two = sa.select(checkpoints.c.name).order_by(checkpoints.c.seq).limit(2)
    assert await _sync(engine, lambda conn: fetch_all(conn, first_two)) == [("p0",), ("p1",)]


async def test_numbers_of_every_kind_come_back_as_stored(engine: AsyncEngine) -> None:
    # On PostgreSQL a float column's result processor depends on the driver's column type.
    def work(conn: sa.Connection) -> list[dict[str, Any]]:
        row = {c.name: 0 for c in stats.c} | {
            "trigger_id": "t",
            "day": MOMENT.date(),
            "latency_sum_ms": 12.5,
            "latency_histogram": "{}",
            "last_seq": 7,
        }
        insert_many(conn, stats, [row])
        return fetch_dicts(conn, sa.select(stats))

    [row] = await _sync(engine, work)
    assert (row["day"], row["latency_sum_ms"], row["last_seq"]) == (MOMENT.date(), 12.5, 7)


async def test_updates_by_prefixed_binds(engine: AsyncEngine) -> None:
    await _sync(
        engine,
        lambda conn: insert_many(
            conn, checkpoints, [{"name": "p", "seq": 1, "updated_at": MOMENT}]
        ),
    )
    move = (
        checkpoints.update()
        .where(checkpoints.c.name == sa.bindparam("b_name"))
        .values(seq=sa.bindparam("b_seq"), updated_at=sa.bindparam("b_at"))
    )
    later = MOMENT + timedelta(days=1)
    await _sync(
        engine,
        lambda conn: execute_many(conn, move, [{"name": "p", "seq": 9, "at": later}], prefix="b_"),
    )
    got = await _sync(engine, lambda conn: fetch_all(conn, sa.select(checkpoints)))
    assert got == [("p", 9, later)]


async def test_a_constraint_violation_is_sqlalchemys_integrity_error(engine: AsyncEngine) -> None:
    row = {"name": "p", "seq": 1, "updated_at": MOMENT}
    await _sync(engine, lambda conn: insert_many(conn, checkpoints, [row]))
    with pytest.raises(sa.exc.IntegrityError) as caught:
        await _sync(engine, lambda conn: insert_many(conn, checkpoints, [row]))
    assert caught.value.orig is not None and not caught.value.connection_invalidated
    # and the stored row is untouched
    got = await _sync(engine, lambda conn: fetch_all(conn, sa.select(checkpoints.c.seq)))
    assert got == [(1,)]


async def test_bad_sql_is_sqlalchemys_error_and_the_transaction_can_go_on(
    engine: AsyncEngine,
) -> None:
    def work(conn: sa.Connection) -> list[Any]:
        execute_sql(conn, "SAVEPOINT probe")
        with pytest.raises(sa.exc.DBAPIError) as caught:
            execute_sql(conn, "SELECT no_such_column FROM projection_checkpoints")
        assert caught.value.statement.startswith("SELECT no_such_column")
        execute_sql(conn, "ROLLBACK TO SAVEPOINT probe")
        execute_sql(conn, "RELEASE SAVEPOINT probe")
        return fetch_all(conn, sa.select(sa.literal(1)))

    assert await _sync(engine, work) == [(1,)]


async def test_a_statement_on_a_lost_connection_is_an_outage_not_an_assertion(
    engine: AsyncEngine,
) -> None:
    # The appender's held connection runs without SQLAlchemy's transaction (AUTOCOMMIT, its own
    # BEGIN): once a lost connection is invalidated, a statement on it must say the database
    # went away (is_unavailable: a 503), as the statement that found it out did.
    from ledger.appender import is_unavailable

    async with engine.connect() as conn:
        held = await conn.execution_options(isolation_level="AUTOCOMMIT")

        def work(sync: sa.Connection) -> None:
            sync.connection.invalidate()  # as `_on_cursor` does when a statement finds it lost
            execute_sql(sync, "SELECT 1")

        with pytest.raises(sa.exc.InterfaceError) as caught:
            await held.run_sync(work)
    assert caught.value.connection_invalidated
    assert is_unavailable(caught.value)


async def test_many_rows_store_what_one_at_a_time_stores(engine: AsyncEngine) -> None:
    """On PostgreSQL rows alike go as one INSERT … FROM unnest(arrays), others one by one; either
    way each value is stored as SQLAlchemy stores it: NULLs, a shared timestamp, big integers,
    text of any kind (quotes, commas, braces, non-ASCII), in the order given."""
    from ledger.schema import events

    def row(n: int, **changed: Any) -> dict[str, Any]:
        return {
            "seq": 2**40 + n,
            "id": f"id-{n}",
            "stream": f"s,{{{n}}}",
            "version": 1,
            "type": "webhook.received",
            "trigger_id": "t",
            "idempotency_key": None if n % 2 else f'k "{n}" é',
            "data": '{"a": [1, "x\\ny"]}',
            "meta": "{}",
            "recorded_at": MOMENT,
            "hash": f"{n:064x}",
        } | changed

    alike = [row(n) for n in range(5)]
    mixed = [row(5), {k: v for k, v in row(6).items() if k != "idempotency_key"}]
    await _sync(engine, lambda conn: insert_many(conn, events, alike))
    await _sync(engine, lambda conn: insert_many(conn, events, mixed))
    stored = await _sync(
        engine, lambda conn: fetch_dicts(conn, sa.select(events).order_by(events.c.seq))
    )
    expected = [*alike, mixed[0], mixed[1] | {"idempotency_key": None}]
    assert stored == expected


async def test_values_every_row_shares_are_stored_in_every_row(engine: AsyncEngine) -> None:
    """On PostgreSQL a column whose rows all hold one value is bound once, not as an array
    (`shared_columns`): NULLs, a time, a number and text shared, beside columns that differ, come
    back row by row as given."""
    from ledger.schema import events

    rows = [
        {
            "seq": n,
            "id": f"id-{n}",
            "stream": f"s-{n}",
            "version": 1,
            "type": "webhook.received",
            "trigger_id": 'a "shared", {trigger}',
            "idempotency_key": None,
            "data": "{}",
            "meta": '{"é": "\\"}',
            "recorded_at": MOMENT,
            "hash": f"{n:064x}",
        }
        for n in (1, 2, 3)
    ]
    await _sync(engine, lambda conn: insert_many(conn, events, rows))
    stored = await _sync(
        engine, lambda conn: fetch_dicts(conn, sa.select(events).order_by(events.c.seq))
    )
    assert stored == rows


def test_shared_columns_are_those_of_one_value_and_leave_one_array() -> None:
    arrays: dict[str, list[Any]] = {
        "differs": [1, 2],
        "none": [None, None],
        "time": [MOMENT, MOMENT],
        "one_null": [None, "x"],
        "text": ["x", "x"],
    }
    assert shared_columns(arrays) == ("none", "time", "text")
    # every column of one value: the first stays an array, which gives the rows their count
    assert shared_columns({"a": [1, 1], "b": ["x", "x"]}) == ("b",)


async def test_a_violation_in_many_rows_stores_none_of_them(engine: AsyncEngine) -> None:
    first = {"name": "p1", "seq": 1, "updated_at": MOMENT}
    await _sync(engine, lambda conn: insert_many(conn, checkpoints, [first]))
    batch = [{"name": f"p{n}", "seq": n, "updated_at": MOMENT} for n in (0, 1, 2)]
    with pytest.raises(sa.exc.IntegrityError) as caught:
        await _sync(engine, lambda conn: insert_many(conn, checkpoints, batch))
    assert not caught.value.connection_invalidated
    got = await _sync(engine, lambda conn: fetch_all(conn, sa.select(checkpoints.c.name)))
    assert got == [("p1",)]


async def test_a_value_too_long_for_its_column_is_refused_in_many_rows_too(
    engine: AsyncEngine, backend: str
) -> None:
    """The arrays' casts carry no length: a string longer than its column is refused by the
    column, as a row inserted alone is, never cut short by a cast (PostgreSQL; SQLite keeps
    any length)."""
    rows = [{"name": "p" * 64, "seq": 1, "updated_at": MOMENT}, {"name": "q" * 65, "seq": 2}]
    rows[1]["updated_at"] = MOMENT
    if backend == "postgres":
        with pytest.raises(sa.exc.DBAPIError, match="too long"):
            await _sync(engine, lambda conn: insert_many(conn, checkpoints, rows))
        # a value every row shares is bound once (ledger.rows.shared_columns), cast the same way
        shared = [{"name": "q" * 65, "seq": n, "updated_at": MOMENT} for n in (1, 2)]
        with pytest.raises(sa.exc.DBAPIError, match="too long"):
            await _sync(engine, lambda conn: insert_many(conn, checkpoints, shared))
        stored: list[Any] = []
    else:
        await _sync(engine, lambda conn: insert_many(conn, checkpoints, rows))
        stored = [("p" * 64,), ("q" * 65,)]
    got = await _sync(engine, lambda conn: fetch_all(conn, sa.select(checkpoints.c.name)))
    assert sorted(got) == stored


# --- deferred writes (PostgreSQL): a write waits and goes with the next statement -------------


def _checkpoint(name: str, seq: int) -> dict[str, Any]:
    return {"name": name, "seq": seq, "updated_at": MOMENT}


def _day(trigger_id: str, received: int) -> dict[str, Any]:
    counts = dict.fromkeys(COUNTERS, 0) | {"received": received}
    return DayStats(counts).to_row((trigger_id, MOMENT.date()))


_SEQ_OF = sa.select(checkpoints.c.seq).where(checkpoints.c.name == sa.bindparam("name"))
_STATS_OF = sa.select(stats.c.received).where(stats.c.trigger_id == sa.bindparam("trigger"))
_MOVE = (
    checkpoints.update()
    .where(checkpoints.c.name == sa.bindparam("b_name"))
    .values(seq=sa.bindparam("b_seq"))
)


async def test_deferred_writes_keep_each_tables_order_and_what_each_statement_sees(
    engine: AsyncEngine,
) -> None:
    """Writes that wait go with a later statement on another table (its parameters after
    theirs), and before any statement on their own table, which sees them; a second write to a
    table goes after the first. The same results as without deferring (SQLite never defers)."""
    await _sync(engine, lambda conn: insert_many(conn, stats, [_day("t", 7)]))
    moved = _MOVE

    def work(conn: sa.Connection) -> list[Any]:
        defer_writes(conn)
        try:
            insert_many(conn, checkpoints, [_checkpoint("a", 1), _checkpoint("b", 2)])
            seen = [fetch_all(conn, _STATS_OF, {"trigger": "t"})]  # goes with the insert
            execute_many(conn, moved, [{"name": "a", "seq": 10}], prefix="b_")  # waits
            seen.append(fetch_all(conn, _SEQ_OF, {"name": "a"}))  # sees it
            insert_many(conn, checkpoints, [_checkpoint("c", 3)])  # waits
            execute_many(conn, moved, [{"name": "c", "seq": 30}], prefix="b_")  # sees it
            seen.append(fetch_all(conn, sa.text("SELECT count(*) FROM projection_checkpoints")))
            execute_many(conn, moved, [{"name": "b", "seq": 20}], prefix="b_")
            flush(conn)
            return seen
        finally:
            stop_deferring(conn)

    assert await _sync(engine, work) == [[(7,)], [(10,)], [(3,)]]
    got = await _sync(engine, lambda conn: fetch_all(conn, sa.select(checkpoints.c.seq)))
    assert sorted(got) == [(10,), (20,), (30,)]


async def test_a_deferred_writes_error_is_raised_by_the_statement_it_went_with(
    engine: AsyncEngine, backend: str
) -> None:
    await _sync(engine, lambda conn: insert_many(conn, checkpoints, [_checkpoint("a", 1)]))

    def work(conn: sa.Connection) -> None:
        defer_writes(conn)
        try:
            if backend == "postgres":
                insert_many(conn, checkpoints, [_checkpoint("a", 2)])  # waits, and fails…
                with pytest.raises(sa.exc.IntegrityError):
                    fetch_all(conn, _STATS_OF, {"trigger": "t"})  # …with this one
            else:
                with pytest.raises(sa.exc.IntegrityError):  # SQLite: at once
                    insert_many(conn, checkpoints, [_checkpoint("a", 2)])
        finally:
            stop_deferring(conn)

    await _sync(engine, work)
    got = await _sync(engine, lambda conn: fetch_all(conn, sa.select(checkpoints.c.seq)))
    assert got == [(1,)]


async def test_discarded_writes_are_never_sent(engine: AsyncEngine, backend: str) -> None:
    if backend != "postgres":
        pytest.skip("only PostgreSQL defers writes (SQLite's statements cost no round trip)")

    def work(conn: sa.Connection) -> None:
        defer_writes(conn)
        try:
            insert_many(conn, checkpoints, [_checkpoint("a", 1)])
            discard(conn)
            insert_many(conn, checkpoints, [_checkpoint("b", 2)])
            flush(conn)
        finally:
            stop_deferring(conn)

    await _sync(engine, work)
    got = await _sync(engine, lambda conn: fetch_all(conn, sa.select(checkpoints.c.name)))
    assert got == [("b",)]


def _sent_rows(conn: sa.Connection) -> list[tuple[str, int]]:
    """The checkpoints as this transaction holds them on the server, read past the deferral."""
    from sqlalchemy.util import await_only

    driver = conn.connection.driver_connection
    assert driver is not None
    query = "SELECT name, seq FROM projection_checkpoints ORDER BY name"
    return [tuple(row) for row in await_only(driver.fetch(query))]


async def test_disjoint_writes_to_one_table_wait_together(
    engine: AsyncEngine, backend: str
) -> None:
    """Within `disjoint_writes` (a projection's increments and its other rows: never one key
    twice), a second write to a table waits with the first; elsewhere it sends the first."""
    if backend != "postgres":
        pytest.skip("only PostgreSQL defers writes")
    await _sync(engine, lambda conn: insert_many(conn, checkpoints, [_checkpoint("x", 1)]))

    def work(conn: sa.Connection) -> list[Any]:
        seen = []
        defer_writes(conn)
        try:
            with disjoint_writes(conn):
                execute_many(conn, _MOVE, [{"name": "x", "seq": 2}], prefix="b_")
                insert_many(conn, checkpoints, [_checkpoint("y", 1)])
            seen.append(_sent_rows(conn))  # both wait
            execute_many(conn, _MOVE, [{"name": "y", "seq": 3}], prefix="b_")
            seen.append(_sent_rows(conn))  # the two before were sent
            flush(conn)
            seen.append(_sent_rows(conn))
        finally:
            stop_deferring(conn)
        return seen

    assert await _sync(engine, work) == [
        [("x", 1)],
        [("x", 2), ("y", 1)],
        [("x", 2), ("y", 3)],
    ]


# Any sequence of writes and reads gives the same reads and the same tables, deferred or not.
_OPERATION = st.one_of(
    st.tuples(st.just("insert"), st.integers(1, 3)),  # one row, or rows alike (unnest)
    st.tuples(st.just("move"), st.lists(st.integers(0, 5), min_size=1, max_size=3), st.integers()),
    st.tuples(st.just("day"), st.integers(0, 9)),
    st.tuples(st.just("read"), st.sampled_from(["checkpoints", "stats", "text"])),
)
_READS: dict[str, sa.Executable] = {
    "checkpoints": sa.select(checkpoints.c.name, checkpoints.c.seq).order_by(checkpoints.c.name),
    "stats": sa.select(stats.c.trigger_id, stats.c.received).order_by(stats.c.trigger_id),
    "text": sa.text("SELECT count(*), coalesce(sum(seq), 0) FROM projection_checkpoints"),
}


def _replay(conn: sa.Connection, operations: list[Any], deferring: bool) -> list[Any]:
    if deferring:
        defer_writes(conn)
    seen: list[Any] = []
    made = days = 0
    try:
        for operation in operations:
            match operation:
                case ("insert", n):
                    rows = [_checkpoint(f"c{made + i}", made + i) for i in range(n)]
                    insert_many(conn, checkpoints, rows)
                    made += n
                case ("move", names, seq):  # one row: it may wait; more: an executemany
                    moves = [{"name": f"c{i}", "seq": seq % 2**31} for i in names]
                    execute_many(conn, _MOVE, moves, prefix="b_")
                case ("day", received):
                    insert_many(conn, stats, [_day(f"t{days}", received)])
                    days += 1
                case ("read", which):
                    seen.append(fetch_all(conn, _READS[which]))
        flush(conn)
        return [*seen, fetch_all(conn, _READS["checkpoints"]), fetch_all(conn, _READS["stats"])]
    finally:
        stop_deferring(conn)


async def _both_ways(url: str, operations: list[Any]) -> tuple[list[Any], list[Any]]:
    engine = create_engine(url)
    try:
        results = []
        for deferring in (True, False):
            async with engine.connect() as conn:
                await conn.begin()
                results.append(await conn.run_sync(_replay, operations, deferring))
                await conn.rollback()
        return results[0], results[1]
    finally:
        await engine.dispose()


@hsettings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=st.lists(_OPERATION, min_size=1, max_size=14))
def test_deferred_writes_read_and_leave_what_writes_at_once_do(
    engine: AsyncEngine, database_url: str, backend: str, operations: list[Any]
) -> None:
    """Each example runs twice in a transaction rolled back after it (on the database the
    `engine` fixture migrated): with its writes deferred, and at once."""
    if backend != "postgres":
        pytest.skip("only PostgreSQL defers writes")
    deferred, at_once = asyncio.run(_both_ways(database_url, operations))
    assert deferred == at_once
