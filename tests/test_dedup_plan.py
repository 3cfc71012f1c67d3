"""Dedup stays O(log n): the appender's own duplicate query probes the idempotency index however
many keys a batch asks about (SQLite's planner switched to scanning the type index at ~10)."""

from __future__ import annotations

import pytest
from factories import delivery
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.appender import _originals_query, append_commands
from ledger.commands import RecordDelivery
from ledger.schema import IDEMPOTENCY_INDEX
from ledger.store import write_transaction


def _delivery(key: str) -> RecordDelivery:
    return delivery(key, initial_status="recorded")


@pytest.mark.parametrize("asked", [2, 10, 100, 1000])
async def test_a_batch_of_any_size_looks_its_keys_up_in_the_index(
    engine: AsyncEngine, backend: str, asked: int
) -> None:
    async with write_transaction(engine) as conn:
        await append_commands(conn, [_delivery(f"k{i}") for i in range(300)])
    statement, params = _originals_query({("t", f"k{i}") for i in range(asked)})
    async with engine.connect() as conn:
        bound = statement.params(params)  # type: ignore[attr-defined]
        sql = str(bound.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        if backend == "postgres":
            await conn.exec_driver_sql("ANALYZE events")
            await conn.exec_driver_sql("SET enable_seqscan = off")
            plan = "\n".join(r[0] for r in await conn.exec_driver_sql("EXPLAIN " + sql))
        else:
            rows = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)
            plan = "\n".join(str(r[-1]) for r in rows)
    assert IDEMPOTENCY_INDEX in plan, plan
