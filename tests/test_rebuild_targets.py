"""`rebuild --into T`: never one of hookledger's own tables, only a plain name; refused before
anything is touched. A table an earlier `--into` made can be filled again."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine
from test_projections import snapshot
from traffic import mixed_traffic, run_cli, settle

from ledger.store import create_engine
from projections.errors import InvalidRebuildTarget
from projections.rebuild import rebuild
from projections.registry import PROJECTIONS, TRIGGER_EXECUTIONS
from server.config import Settings

OWN = [
    "events",
    "projection_checkpoints",
    "secret_key_check",
    "triggers",
    "trigger_executions",
    "trigger_stats",
    "alembic_version",
    "trigger_executions__rebuild",  # a swapping rebuild's scratch table
    "trigger_stats__rebuild",
]
NOT_PLAIN = [
    "",
    "Events",  # SQLite's names ignore case: this is the log
    "EVENTS",
    '"events"',
    "public.events",
    "main.events",
    "events; DROP TABLE events",
    "te then",
    "9lives",
    "t" * 64,
    "sqlite_stat1",
    "pg_temp",
]


async def database_state(engine: AsyncEngine) -> dict[str, int]:
    """Every table of the database and its row count."""
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
        return {
            name: (await conn.execute(sa.text(f'SELECT count(*) FROM "{name}"'))).scalar_one()
            for name in names
        }


@pytest.fixture
async def traffic(client: TestClient, settings: Settings) -> Any:  # type: ignore[type-arg]
    await mixed_traffic(client, deliveries=20)
    await settle(client)
    engine = create_engine(settings.database_url)
    yield engine
    await engine.dispose()


async def test_rebuild_refuses_hookledger_own_tables_and_leaves_everything_as_it_was(
    traffic: AsyncEngine,
) -> None:
    before = await database_state(traffic)
    assert before["events"] > 20
    for projection in PROJECTIONS.values():
        for name in OWN + NOT_PLAIN:
            with pytest.raises(InvalidRebuildTarget):
                await rebuild(traffic, projection, into=name)
            assert await database_state(traffic) == before, (projection.name, name)


async def test_cli_rebuild_into_the_log_is_an_error_and_the_log_stays(
    traffic: AsyncEngine, settings: Settings
) -> None:
    before = await database_state(traffic)
    for name in ("events", "Events"):
        refused = await run_cli(
            settings.database_url, "rebuild", "trigger_executions", "--into", name
        )
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.startswith(f"error: cannot rebuild into {name!r}"), refused.stderr
        assert "Traceback" not in refused.stderr
    assert await database_state(traffic) == before


async def test_a_table_made_by_rebuild_into_can_be_rebuilt_into_again(
    traffic: AsyncEngine, settings: Settings
) -> None:
    live = await snapshot(traffic, "trigger_executions")
    for _ in range(2):
        made = await run_cli(
            settings.database_url, "rebuild", "trigger_executions", "--into", "te_then"
        )
        assert made.returncode == 0, made.stderr
        assert await snapshot(traffic, "te_then") == live
    again = await rebuild(traffic, TRIGGER_EXECUTIONS, until_seq=3, into="te_then")
    assert again.table == "te_then" and not again.swapped
    assert len(await snapshot(traffic, "te_then")) < len(live)
    assert await snapshot(traffic, "trigger_executions") == live
