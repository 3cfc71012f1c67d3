"""`rebuild --into T`: never one of hookledger's own tables, only a plain name; refused before
anything is touched. A table an earlier `--into` made can be filled again; a table of the user's
is refused, rows and all left as they were, unless `--replace` asks for it; a view or an index
never is replaced."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine
from test_projections import snapshot
from traffic import mixed_traffic, run_cli, settle

from ledger.store import create_engine
from projections.errors import InvalidRebuildTarget, RebuildTargetExists
from projections.rebuild import rebuild
from projections.registry import PROJECTIONS, TRIGGER_EXECUTIONS, TRIGGER_STATS
from server.config import Settings

OWN = [
    "events",
    "projection_checkpoints",
    "secret_key_check",
    "triggers",
    "trigger_executions",
    "trigger_stats",
    "alembic_version",
    "rebuild_targets",
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


def _schema_of(sync: sa.Connection, table: str) -> dict[str, Any]:
    inspector = sa.inspect(sync)
    return {
        "columns": [c["name"] for c in inspector.get_columns(table)],
        "primary_key": inspector.get_pk_constraint(table),
        "indexes": sorted(
            (i["name"], tuple(i["column_names"]), bool(i["unique"]))
            for i in inspector.get_indexes(table)
        ),
        "unique": sorted(
            (u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)
        ),
    }


async def test_a_swapping_rebuild_leaves_each_table_as_its_migration_made_it(
    traffic: AsyncEngine,
) -> None:
    """Names and order and all: a swapped-in table's primary key was named after the scratch
    table on PostgreSQL (`trigger_executions__rebuild_pkey`, then `…_pkey1` at the next swap)
    and not named on SQLite, and its columns came in the model's order, not the migrations'."""
    for projection in PROJECTIONS.values():
        name = projection.table.name
        async with traffic.connect() as conn:
            migrated = await conn.run_sync(_schema_of, name)
        live = await rows_of(traffic, name)
        assert live
        for _ in range(2):
            assert (await rebuild(traffic, projection)).swapped
            async with traffic.connect() as conn:
                assert await conn.run_sync(_schema_of, name) == migrated, name
            assert await rows_of(traffic, name) == live


USERS_ROWS = [(1, "ada"), (2, "grace")]


async def make_users_table(engine: AsyncEngine, name: str) -> None:
    """A table of the user's own, with rows: what a typo in `--into` must never lose."""
    async with engine.begin() as conn:
        await conn.execute(sa.text(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, who TEXT)"))
        await conn.execute(sa.text(f"INSERT INTO {name} VALUES (1, 'ada'), (2, 'grace')"))


async def rows_of(engine: AsyncEngine, name: str) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(sa.text(f"SELECT * FROM {name} ORDER BY 1"))]


async def recorded_targets(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    query = "SELECT name, projection, until_seq FROM rebuild_targets ORDER BY name"
    async with engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(sa.text(query))]


async def test_a_users_table_is_refused_by_the_cli_and_the_api_and_keeps_its_rows(
    traffic: AsyncEngine, settings: Settings
) -> None:
    await make_users_table(traffic, "customers")
    await make_users_table(traffic, "trigger_executions_at_3")  # the name --until-seq 3 takes
    before = await database_state(traffic)
    for args in (("--into", "customers"), ("--until-seq", "3")):
        refused = await run_cli(settings.database_url, "rebuild", "trigger_executions", *args)
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.startswith("error: cannot rebuild into '"), refused.stderr
        assert "a table of that name exists that no rebuild made" in refused.stderr
        assert "--replace" in refused.stderr and "Traceback" not in refused.stderr
    for projection in PROJECTIONS.values():
        with pytest.raises(RebuildTargetExists):
            await rebuild(traffic, projection, into="customers")
    assert await database_state(traffic) == before
    assert await rows_of(traffic, "customers") == USERS_ROWS
    assert await rows_of(traffic, "trigger_executions_at_3") == USERS_ROWS


async def test_a_rebuilt_table_dropped_and_made_again_by_the_user_is_the_users(
    traffic: AsyncEngine,
) -> None:
    await rebuild(traffic, TRIGGER_EXECUTIONS, into="te_then")
    async with traffic.begin() as conn:
        await conn.execute(sa.text("DROP TABLE te_then"))
    # The user's own table, made with the very columns of the projection's, and their rows.
    async with traffic.begin() as conn:
        await conn.run_sync(TRIGGER_EXECUTIONS.shadow_table("te_then").create)
        await conn.execute(sa.text("INSERT INTO te_then SELECT * FROM trigger_executions"))
    kept = await snapshot(traffic, "te_then")
    before = await database_state(traffic)
    with pytest.raises(RebuildTargetExists, match="no rebuild made"):
        await rebuild(traffic, TRIGGER_EXECUTIONS, until_seq=3, into="te_then")
    assert await database_state(traffic) == before
    assert await snapshot(traffic, "te_then") == kept


async def test_a_view_or_an_index_of_the_name_is_refused_even_with_replace(
    traffic: AsyncEngine, settings: Settings
) -> None:
    await make_users_table(traffic, "customers")
    async with traffic.begin() as conn:
        await conn.execute(sa.text("CREATE VIEW recent AS SELECT seq FROM events"))
        await conn.execute(sa.text("CREATE INDEX customers_who ON customers (who)"))
    before = await database_state(traffic)
    for name, kind in (("recent", "view"), ("customers_who", "index")):
        with pytest.raises(RebuildTargetExists, match=f"a {kind} of that name exists"):
            await rebuild(traffic, TRIGGER_EXECUTIONS, into=name, replace=True)
    refused = await run_cli(
        settings.database_url, "rebuild", "trigger_stats", "--into", "recent", "--replace"
    )
    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.startswith("error: cannot rebuild into 'recent': a view"), refused.stderr
    assert await database_state(traffic) == before
    async with traffic.connect() as conn:
        assert (await conn.execute(sa.text("SELECT count(*) FROM recent"))).scalar_one() > 20


async def test_replace_builds_into_a_users_table_which_is_then_a_rebuilt_one(
    traffic: AsyncEngine, settings: Settings
) -> None:
    await make_users_table(traffic, "customers")
    live = await snapshot(traffic, "trigger_executions")
    alone = await run_cli(settings.database_url, "rebuild", "trigger_executions", "--replace")
    assert alone.returncode == 1 and alone.stderr.startswith("error: --replace goes with --into")
    assert await rows_of(traffic, "customers") == USERS_ROWS
    for extra in (["--replace"], []):  # replaced once on purpose, it is a rebuilt table
        made = await run_cli(
            settings.database_url, "rebuild", "trigger_executions", "--into", "customers", *extra
        )
        assert made.returncode == 0, made.stderr
        assert await snapshot(traffic, "customers") == live
    head = (await database_state(traffic))["events"]
    assert await recorded_targets(traffic) == [("customers", "trigger_executions", head)]


async def test_new_names_are_made_and_recorded_as_rebuild_targets(
    traffic: AsyncEngine, settings: Settings
) -> None:
    live = await snapshot(traffic, "trigger_executions")
    for args in (("--into", "te_new"), ("--until-seq", "3")):
        made = await run_cli(settings.database_url, "rebuild", "trigger_executions", *args)
        assert made.returncode == 0, made.stderr
    assert await snapshot(traffic, "te_new") == live
    assert (await rebuild(traffic, TRIGGER_STATS, into="stats_new")).table == "stats_new"
    head = (await database_state(traffic))["events"]
    assert await recorded_targets(traffic) == [
        ("stats_new", "trigger_stats", head),
        ("te_new", "trigger_executions", head),
        ("trigger_executions_at_3", "trigger_executions", 3),
    ]
