"""Fixtures: every database test runs on a real SQLite file and on the real PostgreSQL.

PostgreSQL tests create a database of their own (random name) on HOOKLEDGER_TEST_PG_URL
(default postgresql://postgres@127.0.0.1:5432/test) and drop it after. Where no PostgreSQL answers
they skip with the reason — unless HOOKLEDGER_REQUIRE_POSTGRES=1 (CI), where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
from aiohttp import TCPConnector, web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings as hypothesis_settings
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.appender import Appender
from ledger.migrate import upgrade
from ledger.store import create_engine
from server.app import make_app
from server.config import Settings
from server.listener import make_runner
from server.state import SERVICES

PG_URL = os.environ.get("HOOKLEDGER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("HOOKLEDGER_REQUIRE_POSTGRES") == "1"
ADMIN_TOKEN = "test-admin-token"
BACKENDS = ["sqlite", "postgres"]

# Tests share two cores with servers, databases and a browser: time limits per example would
# only measure the machine's load. Hypothesis still bounds the number of examples.
hypothesis_settings.register_profile("hookledger", deadline=None)
hypothesis_settings.load_profile("hookledger")

# The servers and commands the tests start run this checkout's code, wherever they run from and
# wherever the package was installed from in editable mode (a second worktree sharing one venv).
ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)


async def _pg_admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(PG_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        reason = f"PostgreSQL not reachable at {PG_URL}: {exc}"
        if REQUIRE_PG:
            pytest.fail(reason + " (HOOKLEDGER_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)


async def create_pg_database() -> str:
    admin = await _pg_admin()
    name = f"hl_test_{secrets.token_hex(6)}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_URL.rsplit("/", 1)[0]
    return f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://")


async def drop_pg_database(url: str) -> None:
    admin = await _pg_admin()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'hookledger.db'}"
        return
    url = await create_pg_database()
    try:
        yield url
    finally:
        await drop_pg_database(url)


@pytest.fixture
def backend(database_url: str) -> str:
    return "postgres" if database_url.startswith("postgresql") else "sqlite"


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        secret_key="test-secret-key",
        data_dir=tmp_path,
        allow_private_destinations=True,
        dispatch=False,
        replay_interval_s=60.0,
    )


MakeClient = Callable[..., Any]


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the test's database, migrated to the head (a module may define its own)."""
    engine = create_engine(database_url)
    await upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def pg_engine() -> AsyncIterator[AsyncEngine]:
    """A migrated database of its own on PostgreSQL only (what SQLite has not: the appender's
    held connection, its one-statement batches)."""
    url = await create_pg_database()
    engine = create_engine(url)
    try:
        await upgrade(engine)
        yield engine
    finally:
        await engine.dispose()
        await drop_pg_database(url)


@pytest.fixture
async def appender(engine: AsyncEngine) -> AsyncIterator[Appender]:
    """The group-commit appender on `engine`, running (no projections folded unless the test
    gives it a folder)."""
    async with Appender(engine).running() as appender:
        yield appender


class ListenerServer(TestServer):
    """The app served as `hookledger serve` serves it (server/listener.py): each connection
    starts in the fast lane, which answers webhook POSTs and hands anything else to aiohttp."""

    def __init__(self, app: web.Application, settings: Settings) -> None:
        super().__init__(app)
        self._settings = settings

    async def _make_runner(self, **_kwargs: Any) -> web.BaseRunner:
        return make_runner(self.app, self._settings)


class AiohttpServer(TestServer):
    """The app served by aiohttp alone, with aiohttp's body decoding off as make_runner has it:
    the app decodes bodies itself (server/codings.py)."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return web.AppRunner(self.app, auto_decompress=False, **kwargs)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A module marked `lanes` runs its tests on both ways to the receiver: the listener's fast
    # lane (what serve runs) and aiohttp's route (a connection the fast lane handed over).
    if "lane" in metafunc.fixturenames:
        marked = metafunc.definition.get_closest_marker("lanes") is not None
        metafunc.parametrize("lane", LANES if marked else LANES[:1])


LANES = ["listener", "aiohttp"]


async def serve_app(
    aiohttp_client: MakeClient, app: web.Application, lane: str
) -> TestClient[Any, Any]:
    """A client of `app`. On the listener, every request gets a connection of its own, so that
    each takes the lane its own kind takes (a webhook POST the fast lane); on aiohttp's, the app
    is served by aiohttp alone."""
    if lane == "aiohttp":
        return cast(TestClient[Any, Any], await aiohttp_client(AiohttpServer(app)))
    settings = app[SERVICES].settings
    client = await aiohttp_client(
        ListenerServer(app, settings), connector=TCPConnector(force_close=True)
    )
    return cast(TestClient[Any, Any], client)


@pytest.fixture
async def client(aiohttp_client: MakeClient, settings: Settings, lane: str) -> TestClient:  # type: ignore[type-arg]
    return await serve_app(aiohttp_client, make_app(settings), lane)


# A dispatching server and a real destination (tests/destinations.py), for the dispatch and
# replay suites; a module that defines its own `app` or `destination` fixture overrides these.


@pytest.fixture
def dispatching(settings: Settings) -> Settings:
    """Settings of a server that dispatches, polling and leasing fast enough for a test."""
    return replace(settings, dispatch=True, dispatch_poll_s=0.05, lease_s=1.0)


@pytest.fixture
async def app(aiohttp_client: MakeClient, dispatching: Settings, lane: str) -> TestClient:  # type: ignore[type-arg]
    """A dispatching server."""
    return await serve_app(aiohttp_client, make_app(dispatching), lane)


@pytest.fixture
async def destination(aiohttp_server: Any) -> AsyncIterator[Any]:
    """A local destination that answers as each test scripts it (destinations.Destination)."""
    from destinations import start_destination  # it imports this module: not at the top

    async for running in start_destination(aiohttp_server):
        yield running


AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@contextlib.contextmanager
def sqlite_write_lock(database_url: str) -> Iterator[None]:
    """Another process's writer on a SQLite file: its write lock (BEGIN IMMEDIATE) held."""
    holder = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def create_trigger(client: TestClient, **config: Any) -> dict[str, Any]:  # type: ignore[type-arg]
    config.setdefault("source", "generic")
    response = await client.post("/api/triggers", json=config, headers=AUTH)
    assert response.status == 201, await response.text()
    return await response.json()  # type: ignore[no-any-return]
