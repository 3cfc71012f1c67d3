"""`hookledger export`: the log and projections as JSON lines and CSV; the analytics role's SQL."""

from __future__ import annotations

import csv
import io
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from conftest import ADMIN_TOKEN, AUTH, create_pg_database, drop_pg_database
from traffic import mixed_traffic, run_cli, settle

from ledger.codec import parse_time
from ledger.store import create_engine
from projections.rebuild import rebuild
from projections.registry import TRIGGER_STATS
from server.app import make_app
from server.config import Settings

DOCS = Path(__file__).parent.parent / "docs" / "analytics.md"


async def api_events(client: TestClient) -> list[dict[str, Any]]:  # type: ignore[type-arg]
    page = await (await client.get("/api/events?after=0&limit=1000", headers=AUTH)).json()
    return page["events"]  # type: ignore[no-any-return]


def same_event(exported: dict[str, Any], api: dict[str, Any]) -> bool:
    moment = parse_time(exported["recorded_at"]) == parse_time(api["recorded_at"])
    rest = {k: v for k, v in exported.items() if k != "recorded_at"}
    return moment and rest == {k: v for k, v in api.items() if k != "recorded_at"}


async def test_events_as_json_lines_equal_the_events_api(
    client: TestClient,
    settings: Settings,
    tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    await mixed_traffic(client, deliveries=15)
    api = await api_events(client)
    target = tmp_path / "events.jsonl"
    result = await run_cli(settings.database_url, "export", "events", "--output", str(target))
    assert result.returncode == 0, result.stderr
    assert f"exported {len(api)} rows of events" in result.stderr
    assert "export events [" in result.stderr  # the progress bar
    exported = [orjson.loads(line) for line in target.read_text().splitlines()]
    assert len(exported) == len(api)
    assert all(same_event(e, a) for e, a in zip(exported, api, strict=True))
    after = await run_cli(settings.database_url, "export", "events", "--after", "10")
    assert [orjson.loads(line)["seq"] for line in after.stdout.splitlines()] == [
        e["seq"] for e in api[10:]
    ]


async def test_events_as_csv_keep_data_as_stored_json_text(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await mixed_traffic(client, deliveries=10)
    api = await api_events(client)
    result = await run_cli(settings.database_url, "export", "events", "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == [
        "seq",
        "id",
        "stream",
        "version",
        "type",
        "trigger_id",
        "idempotency_key",
        "data",
        "meta",
        "recorded_at",
        "hash",
    ]
    assert [int(r["seq"]) for r in rows] == [e["seq"] for e in api]
    assert [orjson.loads(r["data"]) for r in rows] == [e["data"] for e in api]
    assert [r["hash"] for r in rows] == [e["hash"] for e in api]


async def test_projections_export_with_their_documented_columns(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await mixed_traffic(client, deliveries=30)
    await settle(client)
    executions = await (
        await client.get("/api/executions?limit=1000&order=asc", headers=AUTH)
    ).json()
    result = await run_cli(settings.database_url, "export", "trigger_executions")
    exported = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [e["last_seq"] for e in exported] == sorted(e["last_seq"] for e in exported)
    by_id = {e["execution_id"]: e for e in exported}
    assert set(by_id) == {e["execution_id"] for e in executions["executions"]}
    for row in executions["executions"]:
        mine = by_id[row["execution_id"]]
        assert {
            k: mine[k]
            for k in ("status", "attempts", "duplicate_count", "replay_count", "last_seq")
        } == {
            k: row[k] for k in ("status", "attempts", "duplicate_count", "replay_count", "last_seq")
        }
        assert parse_time(mine["received_at"]) == parse_time(row["received_at"])
    documented = DOCS.read_text()
    for column in exported[0]:
        assert f"`{column}`" in documented, column

    stats = await (await client.get("/api/stats?days=2", headers=AUTH)).json()
    as_csv = await run_cli(settings.database_url, "export", "trigger_stats", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(rows) == len(stats["stats"])
    for row, api_row in zip(
        sorted(rows, key=lambda r: (r["trigger_id"], r["day"])), stats["stats"], strict=True
    ):
        assert (row["trigger_id"], row["day"], int(row["received"]), int(row["succeeded"])) == (
            api_row["trigger_id"],
            api_row["day"],
            api_row["received"],
            api_row["succeeded"],
        )
        p95 = api_row["latency_p95_ms"]
        assert (float(row["latency_p95_ms"]) if row["latency_p95_ms"] else None) == p95
        assert isinstance(orjson.loads(row["latency_histogram"]), dict)


async def test_export_rejects_what_it_does_not_know(settings: Settings) -> None:
    unknown = await run_cli(settings.database_url, "export", "secrets")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
    aside = await run_cli(settings.database_url, "export", "events", "--table", "other")
    assert aside.returncode == 1 and "own table" in aside.stderr


async def test_export_of_a_table_not_there_or_not_the_projections_says_so(
    client: TestClient,  # type: ignore[type-arg]
    settings: Settings,
) -> None:
    await mixed_traffic(client, deliveries=2)
    for table, said in [
        ("trigger_executions_at_5", "error: no table 'trigger_executions_at_5' in this database"),
        ("events", "error: table 'events' is not a table of trigger_executions"),
    ]:
        refused = await run_cli(
            settings.database_url,
            "export",
            "trigger_executions",
            "--format",
            "csv",
            "--table",
            table,
        )
        assert refused.returncode == 1, refused.stdout
        assert said in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        assert refused.stdout == ""  # not even the CSV header


async def test_an_export_that_fails_leaves_the_file_it_would_have_replaced(
    client: TestClient,  # type: ignore[type-arg]
    settings: Settings,
    tmp_path: Path,
) -> None:
    await mixed_traffic(client, deliveries=2)
    output = tmp_path / "executions.csv"
    output.write_text("yesterday's export\n")
    args = ("export", "trigger_executions", "--format", "csv", "--output", str(output))
    refused = await run_cli(settings.database_url, *args, "--table", "no_such_table")
    assert refused.returncode == 1, refused.stderr
    assert output.read_text() == "yesterday's export\n"  # not emptied by the failed one
    done = await run_cli(settings.database_url, *args)
    assert done.returncode == 0, done.stderr
    to_stdout = await run_cli(settings.database_url, *args[:4])
    assert output.read_text() == to_stdout.stdout != ""
    assert not [name for name in os.listdir(tmp_path) if "partial" in name]  # none left behind


def analytics_sql(role: str, database: str, owner: str) -> list[str]:
    """The statements of docs/analytics.md's analytics-role block, for this test's names."""
    block = re.search(r"```sql\n-- analytics-role\n(.*?)```", DOCS.read_text(), re.S)
    assert block is not None
    text = re.sub(r"--[^\n]*", "", block.group(1))
    text = text.replace("analytics_reader", role).replace(
        "DATABASE hookledger", f'DATABASE "{database}"'
    )
    text = text.replace("FOR ROLE hookledger", f'FOR ROLE "{owner}"')
    return [s.strip() for s in text.split(";") if s.strip()]


@pytest.fixture
async def pg_settings(tmp_path: Path) -> AsyncIterator[Settings]:
    url = await create_pg_database()
    try:
        yield Settings(
            database_url=url,
            admin_token=ADMIN_TOKEN,
            secret_key="k",
            data_dir=tmp_path,
            allow_private_destinations=True,
            dispatch=False,
        )
    finally:
        await drop_pg_database(url)


async def test_the_documented_analytics_role_reads_projections_and_nothing_else(
    aiohttp_client: Any, pg_settings: Settings
) -> None:
    """Roles and grants are PostgreSQL's: this one runs there only."""
    settings = pg_settings
    client = await aiohttp_client(make_app(settings))
    await mixed_traffic(client, deliveries=10)
    await settle(client)
    url = settings.database_url.replace("postgresql+asyncpg://", "postgresql://")
    database = url.rsplit("/", 1)[1]
    role = f"hl_analytics_{secrets.token_hex(4)}"
    owner = await asyncpg.connect(url)
    try:
        for statement in analytics_sql(role, database, await owner.fetchval("SELECT current_user")):
            await owner.execute(statement)
        reader_url = url.replace("postgresql://postgres@", f"postgresql://{role}:change-me@")
        reader = await asyncpg.connect(reader_url)
        try:
            assert await reader.fetchval("SELECT count(*) FROM trigger_stats") > 0
            assert await reader.fetchval("SELECT count(*) FROM trigger_executions") > 0
            assert await reader.fetchval("SELECT count(*) FROM triggers WHERE NOT deleted") == 2
            for forbidden in (
                "SELECT secrets FROM triggers",
                "SELECT count(*) FROM events",
                "DELETE FROM trigger_stats",
                "INSERT INTO projection_checkpoints VALUES ('x', 1, now())",
            ):
                with pytest.raises(asyncpg.PostgresError):
                    await reader.execute(forbidden)
            engine = create_engine(settings.database_url)
            await rebuild(engine, TRIGGER_STATS)  # a new table is swapped in
            await engine.dispose()
            assert await reader.fetchval("SELECT count(*) FROM trigger_stats") > 0
        finally:
            await reader.close()
    finally:
        await owner.execute(f'DROP OWNED BY "{role}"')
        await owner.close()
        admin = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
        try:
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        finally:
            await admin.close()
