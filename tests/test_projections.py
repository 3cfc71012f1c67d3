"""trigger_executions and triggers: the live projection, the admin read API, and rebuilds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from conftest import AUTH, create_trigger
from factories import delivery, recorded_event
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_only

from ledger.append import append_and_fold, append_batch, append_commands
from ledger.appender import Appender
from ledger.commands import AppendEvents
from ledger.events import (
    ExecutionFailed,
    ExecutionReplayRequested,
    ExecutionStarted,
    ExecutionSucceeded,
    NewEvent,
    TriggerPaused,
    TriggerRegistered,
    TriggerResumed,
    execution_stream,
    trigger_stream,
)
from ledger.migrate import upgrade
from ledger.store import create_engine, read_events, read_last_seq, write_transaction
from projections.rebuild import rebuild
from projections.registry import PROJECTIONS, TRIGGER_EXECUTIONS
from projections.runner import ProjectionRunner, read_checkpoints
from projections.trigger_executions import may_make_due
from server.config import Settings
from server.monitoring import read_lag

SPEC_COLUMNS = {
    "execution_id",
    "trigger_id",
    "idempotency_key",
    "received_event_id",
    "status",
    "attempts",
    "error_category",
    "last_error",
    "last_status_code",
    "next_attempt_at",
    "duplicate_count",
    "last_duplicate_at",
    "replay_count",
    "last_replay_at",
    "received_at",
    "completed_at",
    "last_seq",
}


async def deliver(
    client: TestClient, key: str | None = None, body: str = "{}", trigger: str = "t"
) -> Any:  # type: ignore[type-arg]
    headers = {"Content-Type": "application/json"} | ({"Idempotency-Key": key} if key else {})
    response = await client.post(f"/webhooks/{trigger}", data=body, headers=headers)
    assert response.status in (200, 202), await response.text()
    return await response.json()


async def settled(client: TestClient) -> None:  # type: ignore[type-arg]
    """Wait until the live projections have folded everything appended so far."""
    from server.state import SERVICES

    runner = client.app[SERVICES].runner
    async with runner.engine.connect() as conn:
        head = await read_last_seq(conn)
    await runner.wait_for(head)


async def test_executions_show_every_spec_column(client: TestClient) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    first = await deliver(client, key="k1")
    await deliver(client, key="k1", body='{"other": 1}')
    await settled(client)
    page = await (await client.get("/api/executions", headers=AUTH)).json()
    [row] = page["executions"]
    assert set(row) >= SPEC_COLUMNS
    assert row["execution_id"] == first["execution_id"]
    assert row["status"] == "recorded"  # no destination
    assert row["duplicate_count"] == 1 and row["last_duplicate_at"]
    assert row["attempts"] == 0 and row["replay_count"] == 0 and row["error_category"] is None
    assert row["received_event_id"] == first["event_id"]
    detail = await (
        await client.get(f"/api/executions/{first['execution_id']}", headers=AUTH)
    ).json()
    assert [e["type"] for e in detail["events"]] == ["webhook.received", "webhook.duplicate"]
    assert detail["events"][1]["data"]["body_matches"] is False


async def test_filters_and_cursor_paging(client: TestClient) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    await create_trigger(
        client, id="u", filter={"type": "push*"}, destination={"url": "http://127.0.0.1:9/x"}
    )
    made = [(await deliver(client, key=f"k{i}"))["execution_id"] for i in range(7)]
    await deliver(client, body='{"type": "pushed"}', trigger="u")
    await deliver(client, body='{"type": "other"}', trigger="u")
    await settled(client)
    seen: list[str] = []
    cursor = None
    while True:
        query = "/api/executions?trigger_id=t&limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(query, headers=AUTH)).json()
        seen += [r["execution_id"] for r in page["executions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made))
    filtered = await (await client.get("/api/executions?status=filtered", headers=AUTH)).json()
    assert [r["trigger_id"] for r in filtered["executions"]] == ["u"]
    pending = await (
        await client.get("/api/executions?trigger_id=u&status=pending", headers=AUTH)
    ).json()
    assert len(pending["executions"]) == 1
    by_key = await (await client.get("/api/executions?key=k3", headers=AUTH)).json()
    assert [r["idempotency_key"] for r in by_key["executions"]] == ["k3"]
    bad = await client.get("/api/executions?limit=zero", headers=AUTH)
    assert bad.status == 400 and (await bad.json())["error"]["code"] == "invalid_query"


async def test_the_key_filter_is_case_sensitive_on_both_backends(client: TestClient) -> None:  # type: ignore[type-arg]
    """Keys are case-sensitive (`evt_ABC` and `evt_abc` are two deliveries), and so is the
    substring the key filter looks for, as the dashboard's own matching: SQLite's LIKE is not."""
    await create_trigger(client, id="t")
    for key in ("evt_abc", "evt_ABC", "EVT_x%_1"):
        await deliver(client, key=key)
    await settled(client)

    async def keys(part: str) -> list[str]:
        answer = await client.get("/api/executions", params={"key": part}, headers=AUTH)
        page = await answer.json()
        return sorted(r["idempotency_key"] for r in page["executions"])

    assert await keys("ABC") == ["evt_ABC"]
    assert await keys("abc") == ["evt_abc"]
    assert await keys("evt_") == ["evt_ABC", "evt_abc"]
    assert await keys("x%_") == ["EVT_x%_1"]


async def test_events_page_through_the_log(client: TestClient) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    for i in range(5):
        await deliver(client, key=f"k{i}")
    collected, after = [], 0
    while True:
        page = await (await client.get(f"/api/events?after={after}&limit=2", headers=AUTH)).json()
        if not page["events"]:
            break
        collected += [e["seq"] for e in page["events"]]
        after = page["next_after"]
    assert collected == list(range(1, 7))  # trigger.registered + 5 deliveries
    only = await (
        await client.get("/api/events?type=webhook.received&limit=10", headers=AUTH)
    ).json()
    assert len(only["events"]) == 5


async def snapshot(engine: AsyncEngine, table: str) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.text(f'SELECT * FROM "{table}"'))).mappings().all()
    key = "execution_id" if "execution_id" in (rows[0] if rows else {}) else "id"
    return sorted((dict(r) for r in rows), key=lambda r: r.get(key) or "")


async def test_rebuild_equals_live_and_live_serves_meanwhile(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    for i in range(30):
        await deliver(client, key=f"k{i % 20}", body=f'{{"i": {i}}}')
    await settled(client)
    engine = create_engine(settings.database_url)
    live = await snapshot(engine, "trigger_executions")
    during: list[int] = []

    def progress(reached: int, target: int, done: int) -> None:
        during.append(done)

    async def read_while_rebuilding() -> None:
        for _ in range(20):
            response = await client.get("/api/executions?limit=100", headers=AUTH)
            assert response.status == 200
            assert len((await response.json())["executions"]) == 20
            await asyncio.sleep(0)

    result, _ = await asyncio.gather(
        rebuild(engine, TRIGGER_EXECUTIONS, progress=progress), read_while_rebuilding()
    )
    assert result.swapped and result.events == 31 and during
    assert await snapshot(engine, "trigger_executions") == live
    # The live runner goes on from the rebuilt position.
    await deliver(client, key="after-rebuild")
    await settled(client)
    assert len(await snapshot(engine, "trigger_executions")) == 21
    await engine.dispose()


async def test_rebuild_until_seq_builds_a_past_view_aside(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    for i in range(5):
        await deliver(client, key=f"k{i}")
    await settled(client)
    engine = create_engine(settings.database_url)
    result = await rebuild(engine, TRIGGER_EXECUTIONS, until_seq=3, into="te_at_3")
    assert not result.swapped
    assert len(await snapshot(engine, "te_at_3")) == 2
    assert len(await snapshot(engine, "trigger_executions")) == 5
    await engine.dispose()


async def test_projector_catches_up_after_a_restart(database_url: str) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    async with write_transaction(engine) as conn:
        await append_commands(conn, [delivery(f"k{i}") for i in range(25)])
    first = ProjectionRunner(engine, list(PROJECTIONS.values()), batch=10)
    assert await first.step() == 10
    async with engine.connect() as conn:
        assert (await read_checkpoints(conn))["trigger_executions"] == 10
    second = ProjectionRunner(engine, list(PROJECTIONS.values()), batch=10)  # "after a restart"
    await second.catch_up()
    async with engine.connect() as conn:
        assert (await read_checkpoints(conn))["trigger_executions"] == 25
    assert len(await snapshot(engine, "trigger_executions")) == 25
    await engine.dispose()


@dataclass(frozen=True)
class _BrokenAfterApplying:
    """A projection whose fold writes its rows, then fails (a bug in a projection)."""

    inner: Any

    @property
    def name(self) -> str:
        return str(self.inner.name)

    @property
    def table(self) -> sa.Table:
        return self.inner.table  # type: ignore[no-any-return]

    def apply(self, conn: Any, table: sa.Table, events: Any) -> None:
        self.inner.apply(conn, table, events)
        raise RuntimeError("a bug in a fold")


async def _append_and_fold(engine: AsyncEngine, runner: ProjectionRunner, key: str) -> bool:
    def work(conn: sa.Connection) -> bool:
        return append_and_fold(conn, [delivery(key)], runner)[1]

    async with write_transaction(engine) as conn:
        return await conn.run_sync(work)


async def test_a_failing_inline_fold_keeps_the_append_and_leaves_the_fold_to_the_runner(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        executions, stats = PROJECTIONS["trigger_executions"], PROJECTIONS["trigger_stats"]
        healthy = ProjectionRunner(engine, [executions, stats])
        assert await _append_and_fold(engine, healthy, "a") is False  # no checkpoints yet
        await healthy.catch_up()  # checkpoints exist from here on: inline folds may start
        assert await _append_and_fold(engine, healthy, "b") is True
        assert len(await snapshot(engine, "trigger_executions")) == 2

        broken = ProjectionRunner(engine, [executions, _BrokenAfterApplying(stats)])
        assert await _append_and_fold(engine, broken, "c") is False
        assert "evt=inline_fold_failed" in caplog.text
        async with engine.connect() as conn:
            assert await read_last_seq(conn) == 3  # the delivery is in the log
            positions = await read_checkpoints(conn)
        # Rolled back to the savepoint: the projection that had folded "c" did not keep it.
        assert positions["trigger_executions"] == positions["trigger_stats"] == 2
        assert len(await snapshot(engine, "trigger_executions")) == 2
        await healthy.catch_up()
        assert len(await snapshot(engine, "trigger_executions")) == 3
    finally:
        await engine.dispose()


async def test_the_appender_acknowledges_a_delivery_whose_inline_fold_failed_once_and_unfolded(
    engine: AsyncEngine, appender: Appender, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the appender itself: on SQLite its writer opens no savepoint, so a failed fold
    rolls the whole transaction back and the same batch is appended again without folding; on
    PostgreSQL it is undone to the savepoint opened with BEGIN. Either way every delivery is
    answered and in the log once, no projection keeps the failed fold's rows, and the runner
    folds them afterwards."""
    executions, stats = PROJECTIONS["trigger_executions"], PROJECTIONS["trigger_stats"]
    healthy = ProjectionRunner(engine, [executions, stats])
    first = await appender.submit(delivery("a"))
    await healthy.catch_up()  # the checkpoints exist from here on: appends may fold inline
    assert len(await snapshot(engine, "trigger_executions")) == 1

    appender.folder = ProjectionRunner(engine, [executions, _BrokenAfterApplying(stats)])
    outcomes = await asyncio.gather(*(appender.submit(delivery(k)) for k in ("b", "c", "b")))
    assert "evt=inline_fold_failed" in caplog.text
    assert [o.is_duplicate for o in outcomes] == [False, False, True]
    assert outcomes[2].original_event_id == outcomes[0].event_id
    async with engine.connect() as conn:
        logged = [(e.id, e.idempotency_key) for e in await read_events(conn, after=first.seq)]
        positions = await read_checkpoints(conn)
    expected = [(o.event_id, k) for o, k in zip(outcomes, "bcb", strict=True)]
    assert sorted(logged) == sorted(expected)
    assert positions["trigger_executions"] == positions["trigger_stats"] == first.seq
    assert len(await snapshot(engine, "trigger_executions")) == 1  # the fold's rows went

    appender.folder = healthy
    await healthy.catch_up()
    rows = await snapshot(engine, "trigger_executions")
    assert sorted(r["idempotency_key"] for r in rows) == ["a", "b", "c"]
    assert [r["duplicate_count"] for r in rows if r["idempotency_key"] == "b"] == [1]


async def test_a_fold_wakes_the_dispatcher_only_for_what_may_be_due(
    engine: AsyncEngine, appender: Appender
) -> None:
    """`advanced` (the dispatcher's wake) after an inline fold and after the runner's own, both
    judged by `may_make_due`: a delivery kept or filtered and a duplicate wake nothing."""
    runner = ProjectionRunner(engine, list(PROJECTIONS.values()), wakes=may_make_due)
    await appender.submit(delivery("first", initial_status="recorded"))
    await runner.catch_up()  # the runner's fold of a delivery kept only
    assert not runner.advanced.is_set()
    appender.folder = runner  # from here on, folded inline

    async def woke(*commands: Any) -> bool:
        runner.advanced.clear()
        await asyncio.gather(*(appender.submit(c) for c in commands))
        async with engine.connect() as conn:
            assert set((await read_checkpoints(conn)).values()) == {await read_last_seq(conn)}
        return runner.advanced.is_set()

    kept = delivery("a", initial_status="recorded")
    assert not await woke(kept, delivery("b", initial_status="filtered"))
    assert not await woke(delivery("first"), delivery("a"))  # duplicates
    assert await woke(delivery("first"), delivery("c"))  # one pending among them
    replay = NewEvent.of(
        execution_stream(kept.execution_id), "t", ExecutionReplayRequested(requested_by="op")
    )
    assert await woke(AppendEvents(events=[replay]))

    appender.folder = None  # the runner folds after the commit
    await appender.submit(delivery("d"))
    runner.advanced.clear()
    await runner.catch_up()
    assert runner.advanced.is_set()


async def test_an_inline_fold_on_postgres_moves_every_checkpoint_or_none(
    database_url: str, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL checks and moves the checkpoints in one statement: it declines while another
    runner holds the projector lock, or while a checkpoint is not at the head; and when a
    checkpoint changes between that statement's snapshot and its row (a rebuild's swap
    committing meanwhile), it undoes the fold and keeps the append."""
    if backend != "postgres":
        pytest.skip("the projector lock and the one-statement move are PostgreSQL's")
    from projections.runner import PROJECTOR_LOCK_ID

    engine = create_engine(database_url)
    try:
        runner = await _runner_folding_inline(engine)

        async with engine.connect() as other:  # another runner at work
            await other.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": PROJECTOR_LOCK_ID})
            assert await _append_and_fold(engine, runner, "c") is False
            await other.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": PROJECTOR_LOCK_ID})
        async with engine.connect() as conn:
            assert set((await read_checkpoints(conn)).values()) == {2}  # none moved
        await runner.catch_up()

        async with engine.begin() as swap:  # a checkpoint behind the head: declined, none moved
            await swap.execute(
                sa.text("UPDATE projection_checkpoints SET seq = 1 WHERE name = 'triggers'")
            )
        assert await _append_and_fold(engine, runner, "d") is False
        async with engine.connect() as conn:
            assert sorted((await read_checkpoints(conn)).values()) == [1, 3, 3]
        assert "evt=inline_fold_failed" not in caplog.text  # declined, not undone
        await runner.catch_up()

        # The race: the swap has changed its row but not committed when the fold's statement
        # takes its snapshot; it commits while the fold waits for that row.
        await _race_a_swap(engine, runner, "e", caplog, head=5)
        # After a fold that stood at the head, the next folds first and its writes go with the
        # checkpoints' check (one statement): the same race undoes them with the moves.
        assert await _append_and_fold(engine, runner, "f") is True
        assert await _append_and_fold(engine, runner, "g") is True
        await _race_a_swap(engine, runner, "h", caplog, head=8)
    finally:
        await engine.dispose()


async def _runner_folding_inline(engine: AsyncEngine) -> ProjectionRunner:
    """A runner on a migrated `engine` whose last inline fold (of "b", after "a") stood at the
    head: the log and every checkpoint at 2."""
    await upgrade(engine)
    runner = ProjectionRunner(engine, list(PROJECTIONS.values()))
    await _append_and_fold(engine, runner, "a")
    await runner.catch_up()
    assert await _append_and_fold(engine, runner, "b") is True
    return runner


async def _race_a_swap(
    engine: AsyncEngine,
    runner: ProjectionRunner,
    key: str,
    caplog: pytest.LogCaptureFixture,
    *,
    head: int,
) -> None:
    """A swap moves the `triggers` checkpoint back to the head before the last but one while
    an inline fold of `key` (the delivery `head`) waits for its row: the fold and its moves are
    undone, the delivery stays, and the runner folds it after."""
    caplog.clear()
    swap = await engine.connect()
    await swap.begin()
    await swap.execute(
        sa.text("UPDATE projection_checkpoints SET seq = :seq WHERE name = 'triggers'"),
        {"seq": head - 3},
    )
    folding = asyncio.create_task(_append_and_fold(engine, runner, key))
    await asyncio.sleep(0.5)
    assert not folding.done()  # waiting for the swap's row
    await swap.commit()
    await swap.close()
    assert await folding is False
    assert "a checkpoint moved" in caplog.text
    async with engine.connect() as conn:
        assert await read_last_seq(conn) == head  # the delivery is in the log
        positions = await read_checkpoints(conn)
    assert sorted(positions.values()) == [head - 3, head - 1, head - 1]  # moves undone
    assert len(await snapshot(engine, "trigger_executions")) == head - 1  # its row too
    await runner.catch_up()
    assert len(await snapshot(engine, "trigger_executions")) == head


async def test_on_postgres_a_fold_that_went_with_the_check_is_undone_quietly_when_declined(
    database_url: str, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The fold after one that stood at the head writes first, its rows going with the
    statement that checks and moves the checkpoints; when that statement declines (a
    checkpoint not at the head), the fold's rows are undone with it, the append stays, nothing
    is logged as a failure, and the next fold checks first again."""
    if backend != "postgres":
        pytest.skip("the folds' writes go with the checkpoints' check on PostgreSQL")
    engine = create_engine(database_url)
    try:
        runner = await _runner_folding_inline(engine)
        async with engine.begin() as conn:  # an append the fold did not see: behind by one
            await conn.run_sync(lambda c: append_and_fold(c, [delivery("c")], None))
        assert await _append_and_fold(engine, runner, "d") is False  # written, then undone
        assert "evt=inline_fold_failed" not in caplog.text
        keys = {r["idempotency_key"] for r in await snapshot(engine, "trigger_executions")}
        assert keys == {"a", "b"}
        async with engine.connect() as conn:
            assert set((await read_checkpoints(conn)).values()) == {2}
            assert await read_last_seq(conn) == 4
        assert await _append_and_fold(engine, runner, "e") is False  # checked first: declined
        await runner.catch_up()
        assert await _append_and_fold(engine, runner, "f") is True
        keys = {r["idempotency_key"] for r in await snapshot(engine, "trigger_executions")}
        assert keys == set("abcdef")
        async with engine.connect() as conn:
            assert set((await read_checkpoints(conn)).values()) == {6}
    finally:
        await engine.dispose()


# --- property: live projection == rebuild, whatever the batches and restarts -----------------

operation = st.one_of(
    st.tuples(
        st.just("deliver"),
        st.sampled_from([None, "a", "b", "c", "d"]),
        st.sampled_from(["{}", "[1]"]),
    ),
    st.tuples(
        st.just("execution"),
        st.integers(0, 9),
        st.sampled_from(["started", "succeeded", "failed", "replay"]),
    ),
    st.tuples(st.just("trigger"), st.sampled_from(["register", "pause", "resume"]), st.just("")),
)


def _execution_event(kind: str, attempt: int) -> Any:
    return {
        "started": ExecutionStarted(attempt=attempt, lease_until="2030-01-01T00:00:00+00:00"),
        "succeeded": ExecutionSucceeded(attempt=attempt, status_code=200, duration_ms=1.5),
        "failed": ExecutionFailed(
            attempt=attempt,
            error_category="transient",
            error="HTTP 503",
            status_code=503,
            retry_at="2030-01-01T00:00:00+00:00",
        ),
        "replay": ExecutionReplayRequested(requested_by="test"),
    }[kind]


def _commands(ops: list[tuple[str, Any, str]]) -> list[Any]:
    commands: list[Any] = []
    executions: list[str] = []
    for kind, arg, extra in ops:
        if kind == "deliver":
            command = delivery(arg, extra)
            executions.append(command.execution_id)
            commands.append(command)
        elif kind == "execution" and executions:
            stream = execution_stream(executions[arg % len(executions)])
            payload = _execution_event(extra, arg + 1)
            commands.append(AppendEvents(events=[NewEvent.of(stream, "t", payload)]))
        elif kind == "trigger":
            payload = {
                "register": TriggerRegistered(id="t", source="generic"),
                "pause": TriggerPaused(id="t"),
                "resume": TriggerResumed(id="t"),
            }[arg]
            commands.append(AppendEvents(events=[NewEvent.of(trigger_stream("t"), "t", payload)]))
    return commands


async def _reset(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.exec_driver_sql("DROP SCHEMA public CASCADE")
            await conn.exec_driver_sql("CREATE SCHEMA public")
        else:
            for (name,) in (
                await conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")
            ).all():
                await conn.exec_driver_sql(f'DROP TABLE "{name}"')
    await upgrade(engine)


def _append_maybe_folded(
    conn: sa.Connection, chunk: list[Any], folder: ProjectionRunner, inline: bool
) -> None:
    # As the server's appender does: folded in the append's own transaction when the
    # projections are at the head, left to the runner otherwise.
    if inline:
        append_and_fold(conn, chunk, folder)
    else:
        append_batch(conn, chunk)


async def _run_property(
    url: str,
    ops: list[Any],
    splits: list[int],
    batches: list[int],
    inline: list[bool],
    window: int = 50_000,
) -> None:
    engine = create_engine(url)
    try:
        await _reset(engine)
        commands = _commands(ops)
        folder = ProjectionRunner(engine, list(PROJECTIONS.values()))
        i = 0
        for n, split in enumerate(splits):
            chunk, i = commands[i : i + split], i + split
            if chunk:
                async with write_transaction(engine) as conn:
                    await conn.run_sync(
                        _append_maybe_folded, chunk, folder, inline[n % len(inline)]
                    )
            # A new runner each time: a restart between any two batches.
            await ProjectionRunner(
                engine, list(PROJECTIONS.values()), batch=batches[n % len(batches)]
            ).step()
        if i < len(commands):
            async with write_transaction(engine) as conn:
                await append_commands(conn, commands[i:])
        await ProjectionRunner(engine, list(PROJECTIONS.values()), batch=batches[0]).catch_up()
        for projection in PROJECTIONS.values():
            live = await snapshot(engine, projection.table.name)
            # A small window puts a delivery, its attempts and its duplicates in different
            # windows of trigger_executions' bulk fold (projections.base.BulkFold).
            await rebuild(engine, projection, into=f"{projection.name}_check", window=window)
            assert await snapshot(engine, f"{projection.name}_check") == live
    finally:
        await engine.dispose()


@pytest.mark.slow
@hsettings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(operation, min_size=1, max_size=30),
    splits=st.lists(st.integers(1, 6), min_size=1, max_size=10),
    batches=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    inline=st.lists(st.booleans(), min_size=1, max_size=4),
    window=st.integers(1, 12),
)
def test_live_projection_equals_rebuild_for_any_history(
    database_url: str,
    ops: list[Any],
    splits: list[int],
    batches: list[int],
    inline: list[bool],
    window: int,
) -> None:
    asyncio.run(_run_property(database_url, ops, splits, batches, inline, window))


def test_applying_an_event_twice_equals_once() -> None:
    from projections.trigger_executions import evolve

    received = recorded_event(
        1, "webhook.received", {"execution_id": "x", "initial_status": "pending"}
    )
    duplicate = recorded_event(2, "webhook.duplicate", {"execution_id": "x"})
    once = evolve(evolve(None, received), duplicate)
    twice = evolve(once, duplicate)
    assert once == twice and once is not None and once["duplicate_count"] == 1


def _recorded_event(seq: int, type_: str, data: dict[str, Any], stream: str) -> Any:
    return recorded_event(seq, type_, data, stream=stream, idempotency_key="k")


async def test_the_live_fold_of_duplicates_equals_evolve_event_by_event(
    engine: AsyncEngine,
) -> None:
    """Duplicates take the projection's Increment (an UPDATE of the row where it stands, unread);
    whatever the batches, the row is what `evolve` makes of the same events one by one: a batch
    of duplicates alone, duplicates beside another event of their execution (evolve's way),
    the same duplicates given again (no change), a duplicate of an execution without a row."""
    from projections.trigger_executions import evolve

    stream, other = execution_stream("x"), execution_stream("y")
    received = _recorded_event(1, "webhook.received", {"execution_id": "x"}, stream)
    dups = [_recorded_event(n, "webhook.duplicate", {"execution_id": "x"}, stream) for n in (2, 3)]
    started = _recorded_event(
        4, "execution.started", {"attempt": 1, "lease_until": "2026-11-29T00:01:00+00:00"}, stream
    )
    late = [_recorded_event(n, "webhook.duplicate", {"execution_id": "x"}, stream) for n in (5, 6)]
    orphan = _recorded_event(7, "webhook.duplicate", {"execution_id": "y"}, other)
    batches = [[received], dups, [started, late[0]], [late[1], orphan], dups, [late[1]]]

    expected: dict[str, Any] | None = None
    table = TRIGGER_EXECUTIONS.table
    for batch in batches:
        async with write_transaction(engine) as conn:
            await conn.run_sync(TRIGGER_EXECUTIONS.apply, table, batch)
        for event in batch:
            if event.stream == stream:
                expected = evolve(expected, event)
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(table))).mappings().all()
        assert [dict(row) for row in rows] == [expected]
    assert expected is not None and expected["duplicate_count"] == 4
    assert expected["last_seq"] == 6 and expected["status"] == "running"


async def test_duplicates_of_several_executions_in_one_batch_fold_each_its_own(
    engine: AsyncEngine,
) -> None:
    """One Increment for a batch's duplicates of several executions: on PostgreSQL the values
    every execution shares (one duplicate each, the batch's time) are bound once, the others
    (its key, its seqs, its version) as arrays; each row is still what `evolve` makes of it."""
    from dataclasses import replace

    from projections.trigger_executions import evolve

    names = ("x", "y", "z")
    opened = [
        _recorded_event(n, "webhook.received", {"execution_id": e}, execution_stream(e))
        for n, e in enumerate(names, start=1)
    ]
    at = opened[-1].recorded_at
    once = [
        replace(
            _recorded_event(n, "webhook.duplicate", {"execution_id": e}, execution_stream(e)),
            version=2,
            recorded_at=at,
        )
        for n, e in enumerate(names, start=4)
    ]
    twice = [  # x twice, y once: the counts differ, the time is shared
        replace(
            _recorded_event(n, "webhook.duplicate", {"execution_id": e}, execution_stream(e)),
            version=v,
            recorded_at=at,
        )
        for n, e, v in ((7, "x", 3), (8, "x", 4), (9, "y", 3))
    ]
    table = TRIGGER_EXECUTIONS.table
    expected: dict[str, dict[str, Any] | None] = dict.fromkeys(names)
    for batch in (opened, once, twice):
        async with write_transaction(engine) as conn:
            await conn.run_sync(TRIGGER_EXECUTIONS.apply, table, batch)
        for event in batch:
            name = event.data["execution_id"]
            expected[name] = evolve(expected[name], event)
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(table).order_by(table.c.execution_id))).mappings()
        got = [dict(row) for row in rows]
    assert got == [expected[name] for name in names]
    assert [row["duplicate_count"] for row in got] == [3, 2, 1]


async def test_lag_is_exact_when_events_are_folded_while_it_reads(
    database_url: str,
) -> None:
    """The lag (`GET /api/projections`, `/metrics`, `/readyz`, a runner's poll) reads the
    checkpoints and the head of the log in one snapshot. Events appended and folded right after
    its first statement (another process) must put a projection neither ahead of the log
    (negative events behind) nor behind it (a runner's poll would then take the projector lock
    for nothing, and turn the appends' inline folds away)."""
    engine, writer = create_engine(database_url), create_engine(database_url)
    try:
        await upgrade(engine)
        folder = ProjectionRunner(writer, list(PROJECTIONS.values()))
        await _append_and_fold(writer, folder, "a")
        await folder.catch_up()  # the checkpoints exist: the next append is folded inline
        keys = iter(["b", "c"])
        armed: list[bool] = []

        def fold_one_more(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if armed:  # after the first statement of each read
                armed.clear()
                assert await_only(_append_and_fold(writer, folder, next(keys)))

        sa.event.listen(engine.sync_engine, "after_cursor_execute", fold_one_more)
        armed.append(True)
        lag = await ProjectionRunner(engine, list(PROJECTIONS.values())).lag()
        assert not armed and all(behind == 0 for behind in lag.values()), lag
        armed.append(True)
        async with engine.connect() as conn:
            measured = await read_lag(conn, list(PROJECTIONS))
        assert not armed and all(behind == 0 for behind, _ in measured.values()), measured
    finally:
        await engine.dispose()
        await writer.dispose()


async def test_a_runner_with_nothing_to_do_takes_no_lock(database_url: str) -> None:
    """A poll that finds every projection at the head writes nothing and locks nothing: an
    append that found the projector lock (PostgreSQL) or the write lock (SQLite) taken by an
    idle poll would leave its events to the runner, and on PostgreSQL every append after it
    too, their checkpoints then behind, until the runner caught up under the load."""
    engine = create_engine(database_url)
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    try:
        await upgrade(engine)
        runner = ProjectionRunner(engine, list(PROJECTIONS.values()))
        await _append_and_fold(engine, runner, "a")
        sa.event.listen(engine.sync_engine, "before_cursor_execute", record)
        assert await runner.step() == 1  # behind: folds, under the locks
        assert any("advisory" in s or "BEGIN IMMEDIATE" in s for s in sent), sent
        sent.clear()
        assert await runner.step() == 0  # at the head
        assert sent and not any("advisory" in s or "BEGIN IMMEDIATE" in s for s in sent), sent
        assert not any(s.lstrip().upper().startswith(("INSERT", "UPDATE")) for s in sent), sent
    finally:
        await engine.dispose()
