"""trigger_stats: counts and latency per trigger and UTC day, checked against the log itself."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from conftest import AUTH
from factories import MOMENT, recorded_event
from hypothesis import example, given
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine
from traffic import mixed_traffic, run_cli, settle

from ledger.append import append_commands
from ledger.commands import RecordDelivery
from ledger.events import RecordedEvent, WebhookReceived, uuid7
from ledger.migrate import current_revision, head_revision, upgrade
from ledger.store import create_engine, read_events, write_transaction
from projections import histogram
from projections.rebuild import rebuild
from projections.registry import PROJECTIONS, TRIGGER_EXECUTIONS, TRIGGER_STATS
from projections.runner import ProjectionRunner
from projections.trigger_stats import COUNTERS, changes_of
from server.config import Settings


async def whole_log(engine: AsyncEngine) -> list[RecordedEvent]:
    async with engine.connect() as conn:
        return await read_events(conn, limit=1_000_000)


async def traffic_log(client: TestClient, settings: Settings) -> list[RecordedEvent]:  # type: ignore[type-arg]
    """The whole log after the mixed traffic, its dispatch settled."""
    await mixed_traffic(client, deliveries=60)
    await settle(client)
    engine = create_engine(settings.database_url)
    try:
        return await whole_log(engine)
    finally:
        await engine.dispose()


def direct_counts(log: list[RecordedEvent]) -> dict[tuple[str, str], Counter[str]]:
    """The stats, counted straight from the log, without the projection's code."""
    counts: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for e in log:
        c = counts[(e.trigger_id, e.recorded_at.astimezone(UTC).date().isoformat())]
        if e.type == "webhook.received":
            c["received"] += 1
            c["filtered"] += e.data["initial_status"] == "filtered"
        elif e.type == "webhook.duplicate":
            c["duplicates"] += 1
            c["duplicates_body_mismatch"] += not e.data["body_matches"]
        elif e.type == "execution.succeeded":
            c["succeeded"] += 1
        elif e.type == "execution.failed":
            c[f"failed_{e.data['error_category']}"] += 1
        elif e.type == "execution.dead_lettered":
            c["dead_lettered"] += 1
        elif e.type == "execution.replay_requested":
            c["replays"] += 1
    return {k: v for k, v in counts.items() if v}


def exact_percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


# A percentile is rounded to the microsecond, and below a millisecond to four significant
# digits: at most half a unit of its fourth digit, relatively.
ROUNDED = 5e-4


def close_to(estimate: float | None, exact: float) -> bool:
    """Within the histogram's resolution: half a bucket either way (a factor of 2^(1/8)), give
    or take the rounding (a value at a bucket's edge is half a bucket from its middle exactly)."""
    assert estimate is not None
    return exact / histogram.GROWTH**0.5 <= estimate * (
        1 + ROUNDED
    ) and estimate <= exact * histogram.GROWTH**0.5 * (1 + ROUNDED)


async def test_stats_api_matches_a_direct_count_over_the_log(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    log = await traffic_log(client, settings)
    expected = direct_counts(log)
    assert any(c["duplicates_body_mismatch"] for c in expected.values())  # the traffic covers it
    assert any(c["filtered"] for c in expected.values())
    answer = await (await client.get("/api/stats?days=2", headers=AUTH)).json()
    got = {
        (r["trigger_id"], r["day"]): Counter({n: r[n] for n in COUNTERS if r[n]})
        for r in answer["stats"]
    }
    assert got == expected
    for trigger_id in ("alpha", "beta"):
        samples = [
            e.data["duration_ms"]
            for e in log
            if e.type == "execution.succeeded" and e.trigger_id == trigger_id
        ]
        total = answer["totals"][trigger_id]
        assert total["latency_samples"] == len(samples)
        for name, q in (
            ("latency_p50_ms", 0.5),
            ("latency_p95_ms", 0.95),
            ("latency_p99_ms", 0.99),
        ):
            assert close_to(total[name], exact_percentile(samples, q)), (name, total[name])
        assert total["received"] == sum(
            e.type == "webhook.received" and e.trigger_id == trigger_id for e in log
        )


async def test_failed_counts_every_failed_attempt_beside_its_split(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    log = await traffic_log(client, settings)
    failed = Counter(
        (e.trigger_id, e.recorded_at.astimezone(UTC).date().isoformat())
        for e in log
        if e.type == "execution.failed"
    )
    categories = {e.data["error_category"] for e in log if e.type == "execution.failed"}
    assert categories == {"transient", "permanent"}  # the traffic covers both
    answer = await (await client.get("/api/stats?days=2", headers=AUTH)).json()
    for row in answer["stats"]:
        assert row["failed"] == failed[(row["trigger_id"], row["day"])]
        assert row["failed"] == row["failed_transient"] + row["failed_permanent"]
    for trigger_id, total in answer["totals"].items():
        assert total["failed"] == sum(n for (t, _), n in failed.items() if t == trigger_id) > 0
    table = await run_cli(settings.database_url, "stats", "--days", "2")
    assert table.returncode == 0, table.stderr
    header, *rows = (line.split() for line in table.stdout.splitlines())
    column = header.index("failed")
    assert header[column + 1 : column + 3] == ["failed_transient", "failed_permanent"]
    shown = {(row[0], row[1]): int(row[column]) for row in rows}
    for trigger_id, total in answer["totals"].items():
        assert shown[(trigger_id, "total")] == total["failed"]


async def test_total_dead_lettered_is_the_number_dead_lettered_now(client: TestClient) -> None:  # type: ignore[type-arg]
    await mixed_traffic(client, deliveries=60)
    await settle(client)
    answer = await (await client.get("/api/stats?days=1", headers=AUTH)).json()
    executions = await (
        await client.get("/api/executions?status=dead_lettered&limit=1000", headers=AUTH)
    ).json()
    now = Counter(r["trigger_id"] for r in executions["executions"])
    events = sum(total["dead_lettered_events"] for total in answer["totals"].values())
    assert events > sum(now.values())  # some dead letters were replayed: the window counts more
    for trigger_id, total in answer["totals"].items():
        assert total["dead_lettered"] == now.get(trigger_id, 0)
    only = await (await client.get("/api/stats?trigger_id=beta", headers=AUTH)).json()
    assert {r["trigger_id"] for r in only["stats"]} == {"beta"} and set(only["totals"]) == {"beta"}
    bad = await client.get("/api/stats?days=0", headers=AUTH)
    assert bad.status == 400


async def test_days_outside_the_range_are_left_out(client: TestClient, settings: Settings) -> None:  # type: ignore[type-arg]
    await mixed_traffic(client, deliveries=10)
    await settle(client)
    engine = create_engine(settings.database_url)
    async with engine.begin() as conn:
        old = datetime.now(UTC).date() - timedelta(days=3)
        await conn.execute(
            TRIGGER_STATS.table.update()
            .where(TRIGGER_STATS.table.c.trigger_id == "beta")
            .values(day=old)
        )
    await engine.dispose()
    recent = await (await client.get("/api/stats?days=3", headers=AUTH)).json()
    assert {r["trigger_id"] for r in recent["stats"]} == {"alpha"}
    wider = await (await client.get("/api/stats?days=4", headers=AUTH)).json()
    assert [r["day"] for r in wider["stats"] if r["trigger_id"] == "beta"] == [old.isoformat()]


async def rows(engine: AsyncEngine, table: str) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(sa.text(f'SELECT * FROM "{table}" ORDER BY trigger_id, day'))
        return [dict(r) for r in result.mappings()]


async def test_rebuild_equals_live(client: TestClient, settings: Settings) -> None:  # type: ignore[type-arg]
    await mixed_traffic(client, deliveries=50)
    head = await settle(client)
    engine = create_engine(settings.database_url)
    try:
        live = await rows(engine, "trigger_stats")
        result = await rebuild(engine, TRIGGER_STATS, into="trigger_stats_check")
        assert result.until_seq == head
        assert await rows(engine, "trigger_stats_check") == live
        await rebuild(engine, TRIGGER_STATS)  # swapped in, indexes recreated
        assert await rows(engine, "trigger_stats") == live
    finally:
        await engine.dispose()


def delivery(key: str, body: str, *, trigger_id: str = "t") -> RecordDelivery:
    received = WebhookReceived(
        execution_id=uuid7(),
        headers={},
        body=body,
        content_type="application/json",
        body_sha256=body.encode().hex()[:64],
        initial_status="recorded",
    )
    return RecordDelivery.of(trigger_id=trigger_id, idempotency_key=key, received=received)


async def test_upgrade_from_0001_with_events_loses_nothing_and_stats_catch_up(
    database_url: str,
) -> None:
    engine = create_engine(database_url)
    try:
        assert await upgrade(engine, "0001") == "0001"
        async with write_transaction(engine) as conn:
            await append_commands(conn, [delivery(f"k{i % 30}", f"b{i % 40}") for i in range(100)])
        # What a 0001-era server would have projected.
        await ProjectionRunner(engine, [TRIGGER_EXECUTIONS]).catch_up()
        before = await whole_log(engine)
        async with engine.connect() as conn:
            executions = (
                await conn.execute(
                    sa.text("SELECT * FROM trigger_executions ORDER BY execution_id")
                )
            ).all()
        assert await upgrade(engine) == head_revision() == await current_revision(engine)
        assert await whole_log(engine) == before
        async with engine.connect() as conn:
            again = (
                await conn.execute(
                    sa.text("SELECT * FROM trigger_executions ORDER BY execution_id")
                )
            ).all()
        assert again == executions
        runner = ProjectionRunner(engine, list(PROJECTIONS.values()), batch=17)
        await runner.catch_up()
        [row] = await rows(engine, "trigger_stats")
        expected = direct_counts(before)[("t", str(row["day"]))]
        assert (row["received"], row["duplicates"]) == (30, 70)
        assert row["duplicates_body_mismatch"] == expected["duplicates_body_mismatch"] > 0
        assert Counter({n: row[n] for n in COUNTERS if row[n]}) == expected
        assert row["last_seq"] == before[-1].seq
    finally:
        await engine.dispose()


async def test_stats_command_prints_the_table_and_json(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await mixed_traffic(client, deliveries=20)
    await settle(client)
    answer = await (await client.get("/api/stats?days=7", headers=AUTH)).json()
    table = await run_cli(settings.database_url, "stats", "--days", "7")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["trigger_id", "day", "received"]
    assert sum(line.startswith("alpha") for line in lines) == 2  # one day, and the total
    as_json = await run_cli(settings.database_url, "stats", "--trigger", "alpha", "--json")
    parsed = orjson.loads(as_json.stdout)
    assert parsed["stats"] == [r for r in answer["stats"] if r["trigger_id"] == "alpha"]


@given(st.lists(st.floats(min_value=0.001, max_value=600_000), min_size=1, max_size=300))
@example([0.02])  # its bucket's middle, 0.01834 ms, was rounded to 0.018: past the half bucket
def test_histogram_percentiles_are_within_half_a_bucket(samples: list[float]) -> None:
    h: histogram.Histogram = {}
    for ms in samples:
        histogram.add(h, ms)
    for q in (0.5, 0.95, 0.99):
        exact = max(exact_percentile(samples, q), histogram.MIN_MS)
        assert close_to(histogram.percentile(h, q), exact)


@given(
    st.lists(st.floats(min_value=0, max_value=1e5), max_size=50),
    st.lists(st.floats(min_value=0, max_value=1e5), max_size=50),
)
def test_merged_histograms_equal_one_histogram_of_everything(
    a: list[float], b: list[float]
) -> None:
    ha: histogram.Histogram = {}
    hb: histogram.Histogram = {}
    both: histogram.Histogram = {}
    for ms in a:
        histogram.add(ha, ms)
        histogram.add(both, ms)
    for ms in b:
        histogram.add(hb, ms)
        histogram.add(both, ms)
    merged = histogram.merge([histogram.loads(histogram.dumps(ha)), hb])
    assert merged == both
    assert histogram.percentile(merged, 0.95) == histogram.percentile(both, 0.95)


@pytest.mark.parametrize("ms", [0.0, 0.01, 0.0101, 1.0, 250.0, 59_999.0])
def test_a_value_falls_in_the_bucket_whose_bounds_hold_it(ms: float) -> None:
    index = histogram.bucket_of(ms)
    upper = histogram.MIN_MS * histogram.GROWTH**index
    lower = histogram.MIN_MS * histogram.GROWTH ** (index - 1) if index else 0.0
    assert lower < ms <= upper * (1 + 1e-9) or (index == 0 and ms <= histogram.MIN_MS)


async def test_counts_added_in_the_database_equal_the_fold(engine: AsyncEngine) -> None:
    """Days whose events here are counts alone are upserted without being read
    (`_add_counts`); days with a latency sample are read and folded. Whatever the batches, the
    row is what `fold` makes of the same events, and events given again change nothing."""
    from projections.trigger_stats import DayStats, changes_of, fold

    def event(seq: int, type_: str, data: dict[str, Any], day: int = 0) -> RecordedEvent:
        at = MOMENT + timedelta(days=day)
        return recorded_event(
            seq, type_, data, stream=f"execution-{seq}", version=1, recorded_at=at
        )

    received = {"initial_status": "pending"}
    batches = [
        [event(1, "webhook.received", received), event(2, "webhook.received", received)],
        [event(3, "webhook.duplicate", {"body_matches": False}), event(4, "execution.failed", {})],
        [event(5, "execution.succeeded", {"duration_ms": 12.5}), event(6, "webhook.received", {})],
        [event(7, "webhook.received", {"initial_status": "filtered"}, day=1)],
    ]
    table = TRIGGER_STATS.table
    rows: dict[Any, DayStats] = {}
    for batch in [*batches, batches[1], batches[3]]:  # the last two given again
        async with write_transaction(engine) as conn:
            await conn.run_sync(TRIGGER_STATS.apply, table, batch)
        fold(changes_of(batch), rows)
        expected = [rows[key].to_row(key) for key in sorted(rows)]
        async with engine.connect() as conn:
            stored = (await conn.execute(sa.select(table).order_by(table.c.day))).mappings()
            assert [dict(row) for row in stored] == expected
    assert [rows[key].counts["received"] for key in sorted(rows)] == [3, 1]


def test_each_change_is_keyed_by_its_own_trigger_and_day() -> None:
    """`changes_of` finds a day once for events sharing one time and trigger (an append's), and
    anew for each other time or trigger; a delivery's change is the definition's."""
    late = datetime(2026, 11, 29, 23, 59, 59, 999999, tzinfo=UTC)
    next_day = late + timedelta(microseconds=1)

    def event(seq: int, trigger: str, at: datetime, type_: str, **data: Any) -> RecordedEvent:
        return replace(recorded_event(seq, type_, data, recorded_at=at), trigger_id=trigger)

    events = [
        event(1, "a", late, "webhook.received", initial_status="filtered"),
        event(2, "b", late, "webhook.duplicate", body_matches=False),
        event(3, "b", next_day, "webhook.received", initial_status="pending"),
        event(4, "b", next_day, "execution.started", attempt=1),
        event(5, "b", next_day, "webhook.duplicate", body_matches=None),
    ]
    got = [(key, seq, dict(change.counts)) for key, seq, change in changes_of(events)]
    assert got == [
        (("a", late.date()), 1, {"received": 1, "filtered": 1}),
        (("b", late.date()), 2, {"duplicates": 1, "duplicates_body_mismatch": 1}),
        (("b", next_day.date()), 3, {"received": 1, "filtered": 0}),
        (("b", next_day.date()), 5, {"duplicates": 1, "duplicates_body_mismatch": 1}),
    ]
