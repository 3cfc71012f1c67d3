"""One rebuild of a projection at a time: a second one, in this process or another, is refused
(409 `rebuild_in_progress`, or `error: …` from the CLI) while the first runs, and a rebuild that
died never blocks the next."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from conftest import AUTH, sqlite_write_lock
from sqlalchemy.ext.asyncio import AsyncEngine
from test_projections import snapshot
from traffic import mixed_traffic, run_cli, settle

from ledger.store import create_engine
from projections.rebuild import rebuild
from projections.registry import TRIGGER_EXECUTIONS
from projections.runner import PROJECTOR_LOCK_ID
from server.config import Settings
from server.openapi import document

REBUILD = "/api/projections/trigger_executions/rebuild"


@contextlib.asynccontextmanager
async def holding_the_swap(database_url: str) -> AsyncIterator[None]:
    """Make a rebuild wait, its claim taken, before it can finish: the SQLite write lock (its
    table is made under it), or the PostgreSQL projector lock (its swap takes it)."""
    if database_url.startswith("sqlite"):
        with sqlite_write_lock(database_url):
            yield
        return
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PROJECTOR_LOCK_ID)
            yield
    finally:
        await conn.close()


async def post_rebuild(client: TestClient) -> tuple[int, Any]:  # type: ignore[type-arg]
    response = await client.post(REBUILD, headers=AUTH)
    return response.status, await response.json()


async def assert_live_equals_a_fresh_rebuild(engine: AsyncEngine) -> None:
    await rebuild(engine, TRIGGER_EXECUTIONS, into="te_fresh")
    assert await snapshot(engine, "trigger_executions") == await snapshot(engine, "te_fresh")


async def test_of_two_rebuilds_started_together_one_runs_and_one_is_refused(
    client: TestClient,  # type: ignore[type-arg]
    settings: Settings,
) -> None:
    await mixed_traffic(client, deliveries=20)
    await settle(client)
    async with holding_the_swap(settings.database_url):
        both = {asyncio.ensure_future(post_rebuild(client)) for _ in range(2)}
        done, running = await asyncio.wait(both, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and len(running) == 1
        status, body = done.pop().result()
        assert status == 409, body
        assert body["error"]["code"] == "rebuild_in_progress"
        assert "trigger_executions" in body["error"]["message"]
    status, body = await running.pop()
    assert status == 200, body
    engine = create_engine(settings.database_url)
    try:
        await assert_live_equals_a_fresh_rebuild(engine)
    finally:
        await engine.dispose()
    responses = document()["paths"]["/api/projections/{name}/rebuild"]["post"]["responses"]
    assert "409" in responses


_CLAIM_AND_WAIT = """
import asyncio, sys
from ledger.store import create_engine
from projections.targets import claim, scratch_table

async def main():
    engine = create_engine(sys.argv[1])
    async with claim(engine, "trigger_executions", scratch_table("trigger_executions")):
        print("claimed", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_a_rebuild_in_another_process_refuses_the_cli_and_the_api_until_it_dies(
    client: TestClient,  # type: ignore[type-arg]
    settings: Settings,
) -> None:
    await mixed_traffic(client, deliveries=20)
    await settle(client)
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLAIM_AND_WAIT, settings.database_url, stdout=asyncio.subprocess.PIPE
    )
    assert other.stdout is not None
    try:
        assert await asyncio.wait_for(other.stdout.readline(), 60) == b"claimed\n"
        refused = await run_cli(settings.database_url, "rebuild", "trigger_executions")
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.startswith(
            "error: a rebuild of trigger_executions is already in progress"
        ), refused.stderr
        assert (await post_rebuild(client))[0] == 409
    finally:
        other.send_signal(signal.SIGKILL)  # it dies mid-rebuild: nothing lets its claim go
        await other.wait()
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as conn:  # and it left its half-made scratch table behind
            await conn.execute(sa.text("CREATE TABLE trigger_executions__rebuild (junk TEXT)"))
        for _ in range(150):  # PostgreSQL ends a dead session's locks soon after, not at once
            status, body = await post_rebuild(client)
            if status != 409:
                break
            await asyncio.sleep(0.1)
        assert status == 200, body
        await assert_live_equals_a_fresh_rebuild(engine)
    finally:
        await engine.dispose()
