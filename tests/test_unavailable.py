"""The database goes away or fills up: the receiver answers 503 with Retry-After, stores nothing
it did not acknowledge, and recovers by itself. PostgreSQL through a proxy this test controls
(the shared server is never stopped); SQLite in a server process whose file size is limited."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import resource
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from conftest import create_trigger, serve_app, sqlite_write_lock
from factories import delivery
from processes import register, start_server
from tcpproxy import TcpProxy
from test_projections import snapshot

from ledger.appender import Appender
from ledger.errors import StorageUnavailable
from ledger.migrate import upgrade
from ledger.store import APPEND_LOCK_ID, create_engine, read_events
from projections.registry import PROJECTIONS
from projections.runner import ProjectionRunner
from server.app import make_app
from server.config import Settings


def via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"{netloc[0]}@127.0.0.1:{port}" if len(netloc) == 2 else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=host))


async def test_receiver_answers_503_while_the_database_is_away_and_recovers(
    aiohttp_client: Any, settings: Settings, backend: str
) -> None:
    if backend != "postgres":
        pytest.skip("a network database can go away; an SQLite file is in-process")
    target = urlsplit(settings.database_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    proxied = dataclasses.replace(settings, database_url=via(settings.database_url, proxy.port))
    client: TestClient = await aiohttp_client(make_app(proxied))  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    headers = {"Content-Type": "application/json"}

    async def deliver(key: str) -> Any:
        return await client.post(
            "/webhooks/t", data="{}", headers=headers | {"Idempotency-Key": key}
        )

    assert (await deliver("before")).status == 202
    await proxy.cut()
    answers = [await deliver(f"during-{i}") for i in range(3)]
    for answer in answers:
        assert answer.status == 503, await answer.text()
        assert answer.headers["Retry-After"]
        assert (await answer.json())["error"]["code"] == "storage_unavailable"
    await proxy.restore()
    deadline = asyncio.get_running_loop().time() + 20
    while (status := (await deliver("after")).status) != 202:
        assert status == 503
        assert asyncio.get_running_loop().time() < deadline, "did not recover"
        await asyncio.sleep(0.2)
    engine = create_engine(settings.database_url)
    async with engine.connect() as conn:
        keys = [
            e.idempotency_key
            for e in await read_events(conn, limit=100, types=["webhook.received"])
        ]
    await engine.dispose()
    assert keys == ["before", "after"]
    await proxy.cut()


FILE_LIMIT = 4 * 1024 * 1024
PADDING = "x" * 32_000  # ~9 pages of the WAL a delivery: the limit comes after ~100


def limit_file_size() -> None:
    """In the server's process before it starts: no file of it grows past FILE_LIMIT, and a
    write past it fails (EFBIG) instead of killing the process (SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, resource.RLIM_INFINITY))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


async def test_sqlite_past_its_file_size_limit_answers_503_stores_what_it_acknowledged_recovers(
    tmp_path: Path,
) -> None:
    # A disk that fails the writes (EFBIG, not ENOSPC): SQLite's COMMIT says "disk I/O error".
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'hookledger.db'}"
    server = await start_server(database_url, tmp_path, "--no-dispatch", preexec=limit_file_size)
    answers: dict[str, tuple[int, str | None]] = {}
    try:
        async with aiohttp.ClientSession() as session:
            await register(session, server, "t")

            async def deliver(key: str) -> int:
                headers = {"Content-Type": "application/json", "Idempotency-Key": key}
                body = f'{{"key": "{key}", "padding": "{PADDING}"}}'
                async with session.post(
                    server.url + "/webhooks/t", data=body, headers=headers
                ) as r:
                    answers[key] = (r.status, r.headers.get("Retry-After"))
                    return r.status

            sent = 0
            while sum(status == 503 for status, _ in answers.values()) < 20:
                assert sent < 2000, "the file size limit was never reached"
                statuses = await asyncio.gather(*(deliver(f"k{sent + i}") for i in range(8)))
                assert set(statuses) <= {202, 503}, statuses  # never a 500
                sent += 8
            # The limit lifted, as space freed on a full disk: the same process takes writes again.
            resource.prlimit(
                server.process.pid,
                resource.RLIMIT_FSIZE,
                (resource.RLIM_INFINITY, resource.RLIM_INFINITY),
            )
            deadline = asyncio.get_running_loop().time() + 20
            while await deliver(f"after-{sent}") != 202:
                assert asyncio.get_running_loop().time() < deadline, "did not recover"
                sent += 1
                await asyncio.sleep(0.2)
    finally:
        server.stop()
    assert {status for status, _ in answers.values()} == {202, 503}, answers
    assert all(after for status, after in answers.values() if status == 503)
    engine = create_engine(database_url)
    async with engine.connect() as conn:
        stored = {
            e.idempotency_key
            for e in await read_events(conn, limit=100_000, types=["webhook.received"])
        }
    await engine.dispose()
    acknowledged = {key for key, (status, _) in answers.items() if status == 202}
    assert acknowledged <= stored
    assert stored <= answers.keys()  # and a refused one at most stored, never acknowledged


@dataclasses.dataclass(frozen=True)
class _LosesItsConnection:
    """A projection whose fold writes its rows, then sees its connection to PostgreSQL end
    (the server terminates its backend: a failover, an administrator, a network cut)."""

    inner: Any

    @property
    def name(self) -> str:
        return str(self.inner.name)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.inner, attribute)

    def apply(self, conn: Any, table: Any, events: Any) -> None:
        self.inner.apply(conn, table, events)
        conn.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))


async def test_a_connection_lost_during_the_inline_fold_is_an_outage_not_a_fold_failure(
    database_url: str, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The batch's writes and its fold are sent together on PostgreSQL: a connection lost there
    # must fail the batch as the outage it is (503 for every sender in it), not be taken for a
    # failing fold whose recovery (a rollback to the savepoint) runs on no connection at all.
    if backend != "postgres":
        pytest.skip("a network database's connection can end under a transaction")
    engine = create_engine(database_url)
    appender = Appender(engine)
    running = asyncio.create_task(appender.run())
    try:
        await upgrade(engine)
        stats, executions = PROJECTIONS["trigger_stats"], PROJECTIONS["trigger_executions"]
        healthy = ProjectionRunner(engine, [executions, stats])
        await appender.submit(delivery("before"))
        await healthy.catch_up()  # checkpoints at the head: appends fold inline from here on
        appender.folder = ProjectionRunner(engine, [executions, _LosesItsConnection(stats)])
        with pytest.raises(StorageUnavailable):
            await appender.submit(delivery("lost"))
        assert "inline_fold_failed" not in caplog.text
        appender.folder = healthy
        await appender.submit(delivery("after"))  # a new connection, as after any outage
        await healthy.catch_up()
        folded = await snapshot(engine, "trigger_executions")  # by execution id: time-ordered
        assert [row["idempotency_key"] for row in folded] == ["before", "after"]  # none half-kept
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await appender.close()
    async with engine.connect() as conn:
        keys = [e.idempotency_key for e in await read_events(conn, types=["webhook.received"])]
    await engine.dispose()
    assert keys == ["before", "after"]


@contextlib.asynccontextmanager
async def _append_lock_held(database_url: str) -> AsyncIterator[None]:
    """Another process's writer holding the append lock: SQLite's write lock (BEGIN IMMEDIATE on
    the file), PostgreSQL's advisory append lock."""
    if database_url.startswith("sqlite"):
        with sqlite_write_lock(database_url):
            yield
        return
    engine = create_engine(database_url)
    try:
        async with engine.connect() as other:
            lock = sa.text("SELECT pg_advisory_lock(:k)")
            await other.execute(lock, {"k": APPEND_LOCK_ID})
            try:
                yield
            finally:
                unlock = sa.text("SELECT pg_advisory_unlock(:k)")
                await other.execute(unlock, {"k": APPEND_LOCK_ID})
    finally:
        await engine.dispose()


@pytest.mark.lanes
async def test_a_delivery_not_committed_in_time_is_503_and_its_retry_is_recorded_once(
    aiohttp_client: Any, settings: Settings, lane: str
) -> None:
    quick = dataclasses.replace(settings, append_timeout_s=1.0)
    client = await serve_app(aiohttp_client, make_app(quick), lane)
    await create_trigger(client, id="t")
    headers = {"Content-Type": "application/json", "Idempotency-Key": "k"}
    async with _append_lock_held(settings.database_url):
        started = asyncio.get_running_loop().time()
        answer = await client.post("/webhooks/t", data="{}", headers=headers)
        waited = asyncio.get_running_loop().time() - started
        assert answer.status == 503, await answer.text()
        assert answer.headers["Retry-After"]
        assert (await answer.json())["error"]["code"] == "storage_unavailable"
        assert waited < 5  # not the 30 s of SQLite's busy timeout, nor a hang
    # The sender retries: recorded once (its first try may have committed after the lock went).
    deadline = asyncio.get_running_loop().time() + 20
    while (retry := await client.post("/webhooks/t", data="{}", headers=headers)).status == 503:
        assert asyncio.get_running_loop().time() < deadline, "did not recover"
        await asyncio.sleep(0.2)
    assert retry.status in (200, 202), await retry.text()
    engine = create_engine(settings.database_url)
    async with engine.connect() as conn:
        received = await read_events(conn, types=["webhook.received"])
    await engine.dispose()
    assert [e.idempotency_key for e in received] == ["k"]


async def test_a_worker_answers_503_when_the_ledger_cannot_commit_in_time(tmp_path: Path) -> None:
    # The default shape on two cores: the worker waits on the main process over the ledger link.
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'hookledger.db'}"
    server = await start_server(
        database_url,
        tmp_path,
        "--workers",
        "1",
        "--no-dispatch",
        env={"HOOKLEDGER_APPEND_TIMEOUT_S": "1"},
    )
    try:
        async with aiohttp.ClientSession() as session:
            await register(session, server, "t")
            headers = {"Content-Type": "application/json", "Idempotency-Key": "k"}
            async with _append_lock_held(database_url):
                started = asyncio.get_running_loop().time()
                async with session.post(
                    server.url + "/webhooks/t", data="{}", headers=headers
                ) as r:
                    assert r.status == 503, await r.text()
                    assert r.headers["Retry-After"]
                assert asyncio.get_running_loop().time() - started < 5
            async with session.post(server.url + "/webhooks/t", data="{}", headers=headers) as r:
                assert r.status in (200, 202), await r.text()
    finally:
        server.stop()


async def test_a_delivery_a_worker_gave_up_on_while_it_was_queued_is_never_appended(
    database_url: str, tmp_path: Path
) -> None:
    # As in one process (`_Pending.waiting`): a delivery still queued behind a batch that waits
    # for the append lock when its wait runs out is answered 503, and its sender's retry is the
    # delivery. Appended once the lock goes, it would be recorded twice (no key: every delivery
    # is new). On PostgreSQL the held connection ends the waiting batch at the same limit, so
    # the queued one begins before its own runs out; on SQLite the batch waits for the lock.
    server = await start_server(
        database_url,
        tmp_path,
        "--workers",
        "1",
        "--no-dispatch",
        env={"HOOKLEDGER_APPEND_TIMEOUT_S": "1"},
    )
    try:
        async with aiohttp.ClientSession() as session:
            await register(session, server, "t")

            async def deliver(body: str) -> int:
                url, headers = server.url + "/webhooks/t", {"Content-Type": "application/json"}
                async with session.post(url, data=body, headers=headers) as r:
                    return r.status

            async with _append_lock_held(database_url):
                committing = asyncio.create_task(deliver('{"n": 1}'))  # its batch waits
                await asyncio.sleep(0.3)
                queued = await deliver('{"n": 2}')  # behind that batch
                assert (await committing, queued) == (503, 503)
                await asyncio.sleep(1.5)  # past any batch that began before it gave up
            assert await deliver('{"n": 3}') == 202  # what was queued before it was decided
    finally:
        server.stop()
    engine = create_engine(database_url)
    async with engine.connect() as conn:
        bodies = [e.data["body"] for e in await read_events(conn, types=["webhook.received"])]
    await engine.dispose()
    assert '{"n": 2}' not in bodies
    assert bodies[-1] == '{"n": 3}'
