"""`hookledger rebuild NAME --until-seq N | --as-of T`: the past view, aside from the live one."""

from __future__ import annotations

from typing import Any

import orjson
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from traffic import append_outcome, deliver, mixed_traffic, run_cli, settle

from ledger.codec import format_time
from ledger.events import ExecutionStarted
from ledger.store import create_engine, read_event
from projections.runner import read_checkpoints
from server.config import Settings
from server.state import SERVICES


async def table_rows(settings: Settings, table: str) -> list[dict[str, Any]]:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            query = sa.text(f'SELECT * FROM "{table}" ORDER BY execution_id')
            return [dict(r) for r in (await conn.execute(query)).mappings()]
    finally:
        await engine.dispose()


async def checkpoints(settings: Settings) -> dict[str, int]:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            return await read_checkpoints(conn)
    finally:
        await engine.dispose()


async def test_rebuild_until_seq_and_as_of_give_the_past_view_and_leave_live_alone(
    client: TestClient,
    settings: Settings,  # type: ignore[type-arg]
) -> None:
    await mixed_traffic(client, seed=1, deliveries=20)
    then = await settle(client)
    as_it_was = await table_rows(settings, "trigger_executions")
    # Later traffic changes existing rows (outcomes, duplicates, replays) and adds new ones.
    await mixed_traffic_more(client)
    now = await settle(client)
    assert now > then
    live = await table_rows(settings, "trigger_executions")
    assert live != as_it_was
    positions = await checkpoints(settings)

    by_seq = await run_cli(
        settings.database_url, "rebuild", "trigger_executions", "--until-seq", str(then)
    )
    assert by_seq.returncode == 0, by_seq.stderr
    assert f"into trigger_executions_at_{then}" in by_seq.stdout
    assert await table_rows(settings, f"trigger_executions_at_{then}") == as_it_was

    engine = create_engine(settings.database_url)
    async with engine.connect() as conn:
        event = await read_event(conn, then)
    await engine.dispose()
    assert event is not None
    moment = format_time(event.recorded_at)
    by_time = await run_cli(
        settings.database_url,
        "rebuild",
        "trigger_executions",
        "--as-of",
        moment,
        "--into",
        "te_then",
    )
    assert by_time.returncode == 0, by_time.stderr
    assert await table_rows(settings, "te_then") == as_it_was

    assert await table_rows(settings, "trigger_executions") == live  # untouched
    assert await checkpoints(settings) == positions

    exported = await run_cli(
        settings.database_url, "export", "trigger_executions", "--table", "te_then"
    )
    assert exported.returncode == 0, exported.stderr
    records = [orjson.loads(line) for line in exported.stdout.splitlines()]
    assert sorted(r["execution_id"] for r in records) == [r["execution_id"] for r in as_it_was]


async def mixed_traffic_more(client: TestClient) -> None:  # type: ignore[type-arg]
    appender = client.app[SERVICES].appender
    started = ExecutionStarted(attempt=9, lease_until="2031-01-01T00:00:00.000000Z")
    for i in range(8):
        answer = await deliver(client, "alpha", f'{{"kind": "keep", "late": {i}}}', key=f"k{i}")
        if not answer["duplicate"]:
            await append_outcome(appender, "alpha", answer["execution_id"], [started])
