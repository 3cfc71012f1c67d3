"""Dedup stays O(log n): the appender's own duplicate query probes the idempotency index on its
whole key however many keys a batch asks about, and whatever the planner's statistics say
(SQLite's planner switched to scanning the type index at ~10 keys; PostgreSQL, on a table not yet
analysed, probed on trigger_id alone and filtered every delivery of the trigger)."""

from __future__ import annotations

import pytest
from factories import delivery
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.append import append_commands
from ledger.commands import RecordDelivery
from ledger.originals import ORIGINALS_CHUNK, originals_queries
from ledger.schema import IDEMPOTENCY_INDEX
from ledger.store import write_transaction


def _delivery(key: str) -> RecordDelivery:
    return delivery(key, initial_status="recorded")


async def _plans(engine: AsyncEngine, backend: str, keys: set[tuple[str, str]]) -> list[str]:
    """The plan of each statement the appender sends for `keys`, compiled for this backend."""
    plans = []
    async with engine.connect() as conn:
        for statement, params in originals_queries(keys, conn.dialect.name):
            bound = statement.params(params)  # type: ignore[attr-defined]
            compiled = bound.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
            if backend == "postgres":
                rows = await conn.exec_driver_sql(f"EXPLAIN {compiled}")
                plans.append("\n".join(r[0] for r in rows))
            else:
                rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")
                plans.append("\n".join(str(r[-1]) for r in rows))
    return plans


def _assert_probes_the_whole_key(plan: str, backend: str) -> None:
    assert IDEMPOTENCY_INDEX in plan, plan
    if backend == "postgres":
        assert "Seq Scan" not in plan, plan
        assert "Filter" not in plan, plan  # the key is in the Index Cond, not filtered after
        assert "idempotency_key" in plan, plan
    else:
        for line in plan.splitlines():
            if line.startswith("SEARCH later"):  # the version of the original's stream
                assert "COVERING INDEX" in line and "(stream=?)" in line, plan
            elif line.startswith(("SEARCH", "SCAN")):
                assert f"{IDEMPOTENCY_INDEX} (trigger_id=? AND idempotency_key=?)" in line, plan


@pytest.mark.parametrize("asked", [1, 2, 10, 100, 1000])
@pytest.mark.parametrize("analysed", [False, True], ids=["fresh-statistics", "analysed"])
async def test_a_batch_of_any_size_probes_the_index_on_its_whole_key(
    engine: AsyncEngine, backend: str, asked: int, analysed: bool
) -> None:
    async with write_transaction(engine) as conn:
        await append_commands(conn, [_delivery(f"k{i}") for i in range(2000)])
    if analysed:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("ANALYZE")
    keys = {("t", f"k{i}") for i in range(asked)} | {("u", "other")}
    plans = await _plans(engine, backend, keys)
    # PostgreSQL asks for any number of keys in one statement (arrays), SQLite in chunks.
    assert len(plans) == (1 if backend == "postgres" else -(-len(keys) // ORIGINALS_CHUNK))
    for plan in plans:
        _assert_probes_the_whole_key(plan, backend)


async def test_a_batch_larger_than_one_statement_finds_every_original(engine: AsyncEngine) -> None:
    async with write_transaction(engine) as conn:
        first = await append_commands(conn, [_delivery(f"k{i}") for i in range(600)])
    async with write_transaction(engine) as conn:
        again = await append_commands(conn, [_delivery(f"k{i}") for i in range(600)])
    assert all(r.is_duplicate for r in again)
    assert [r.original_event_id for r in again] == [r.event_id for r in first]


async def test_long_keys_and_mixed_triggers_find_exactly_their_originals(
    engine: AsyncEngine,
) -> None:
    """Keys of every length the key rules allow (up to 255) and the same key under two
    triggers: each finds its own original, never another's (PostgreSQL sends them as arrays)."""
    long_keys = ["k" * 255, "k" * 254, "k" * 64, "k" * 65, "x"]
    commands = [
        delivery(key, trigger_id=trigger, initial_status="recorded")
        for trigger in ("t", "u")
        for key in long_keys
    ]
    async with write_transaction(engine) as conn:
        first = await append_commands(conn, commands)
    async with write_transaction(engine) as conn:
        again = await append_commands(conn, [*commands, _delivery("new")])
    assert [r.is_duplicate for r in again] == [True] * len(commands) + [False]
    assert [r.original_event_id for r in again[:-1]] == [r.event_id for r in first]


def test_sqlite_pads_a_statement_with_a_key_found_at_once_not_a_repeated_one() -> None:
    # Each branch of the UNION ALL runs: a repeated key was a duplicate's whole read again (its
    # row, its body's hash, its stream's version) in every padding branch.
    keys = {("t", "a"), ("t", "b"), ("t", "c")}
    ((_statement, params),) = originals_queries(keys, "sqlite")
    asked = [(params[f"trigger_{n}"], params[f"key_{n}"]) for n in range(len(params) // 2)]
    assert asked == [("t", "a"), ("t", "b"), ("t", "c"), ("", "")]
