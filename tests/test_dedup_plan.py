"""Dedup stays O(log n): the appender's own duplicate query probes the idempotency index on its
whole key however many keys a batch asks about, and whatever the planner's statistics say
(SQLite's planner switched to scanning the type index at ~10 keys; PostgreSQL, on a table not yet
analysed, probed on trigger_id alone and filtered every delivery of the trigger)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from factories import delivery
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.append import append_commands
from ledger.codec import dumps
from ledger.commands import DeliveryOutcome, Original, PlanState, RecordDelivery
from ledger.events import Encoded, NewEvent, WebhookDuplicate
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


@pytest.mark.parametrize("same_body", [True, False], ids=["body-matches", "body-differs"])
def test_a_duplicates_event_is_the_webhook_duplicate_payload_it_stands_for(same_body: bool) -> None:
    """The plan builds a duplicate's event without the payload's dataclass when the body matches
    (`matching_duplicate_data`, and `new_event` through the slots): the same data, keys in the
    same order (the hash chain covers its bytes), the same event as `NewEvent.of` but its id."""
    original = _delivery("k")
    repeat = delivery("k", "{}" if same_body else '{"other": 1}', initial_status="recorded")
    [(first, _)] = original.plan(PlanState(versions={}, originals={}))
    state = PlanState(
        versions={first.stream: 1},
        originals={("t", "k"): Original(first.id, original.execution_id, original.body_sha256)},
    )
    [(event, version)] = repeat.plan(state)
    received = repeat.received
    payload = WebhookDuplicate(
        original_event_id=first.id,
        execution_id=original.execution_id,
        body_sha256=repeat.body_sha256,
        body_matches=same_body,
        body=None if same_body else received.body,
        body_encoding=None if same_body else received.body_encoding,
        headers=None if same_body else received.headers,
    )
    expected = NewEvent.of(
        first.stream, "t", payload, idempotency_key="k", meta=Encoded(repeat.meta)
    )
    assert version == 2
    assert isinstance(event.data, dict)
    assert list(event.data.items()) == list(payload.to_data().items())
    assert dumps(event.data) == dumps(expected.data)
    assert dumps(event.meta) == dumps(expected.meta)
    assert replace(event, id=expected.id, meta=expected.meta) == expected
    assert event.id != expected.id
    outcome = repeat.outcome([(event, version)], [7])
    assert outcome == DeliveryOutcome(event.id, original.execution_id, True, first.id, 7, same_body)


def test_a_new_keys_event_is_its_webhook_received() -> None:
    new = _delivery("k")
    [(event, version)] = new.plan(PlanState(versions={}, originals={}))
    assert (event.stream, event.type, event.trigger_id, event.idempotency_key, version) == (
        f"execution-{new.execution_id}",
        "webhook.received",
        "t",
        "k",
        1,
    )
    assert (dumps(event.data), dumps(event.meta)) == (new.data, new.meta)
    assert new.outcome([(event, 1)], [3]) == DeliveryOutcome(
        event.id, new.execution_id, False, None, 3, True
    )
