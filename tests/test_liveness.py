"""PostgreSQL peers that go silent: a network path dropping packets, a process frozen mid-batch.
Neither end waits for ever: the appender closes a connection that does not answer within the
commit wait's limit, the server ends an append transaction left idle (freeing the append lock),
and every connection's socket gives up on a silent peer (TCP_USER_TIMEOUT, keepalive)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from conftest import create_pg_database, drop_pg_database
from factories import delivery as make_delivery
from sqlalchemy.util import await_only
from tcpproxy import TcpProxy
from test_unavailable import via

from ledger.append import append_batch
from ledger.appender import Appender
from ledger.errors import StorageUnavailable
from ledger.held import HeldConnection
from ledger.liveness import DEAD_PEER_S, SERVER_SETTINGS, tcp_socket
from ledger.migrate import upgrade
from ledger.store import create_engine, read_events


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    url = await create_pg_database()
    try:
        engine = create_engine(url)
        await upgrade(engine)
        await engine.dispose()
        yield url
    finally:
        await drop_pg_database(url)


async def test_every_connection_probes_its_peer_and_asks_the_server_to(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        async with engine.connect() as conn:
            shown = {
                name: (await conn.exec_driver_sql(f"SHOW {name}")).scalar_one()
                for name in SERVER_SETTINGS
            }
            sock = tcp_socket((await conn.get_raw_connection()).driver_connection)
            assert sock is not None, "asyncpg's socket is out of reach: see ledger/liveness.py"
            options = {
                "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            }
    finally:
        await engine.dispose()
    assert shown == SERVER_SETTINGS
    assert options == {"keepalive": 1, "idle": 15, "user_timeout_ms": DEAD_PEER_S * 1000}


async def test_a_batch_on_a_path_gone_silent_fails_at_the_limit_and_the_next_connects_again(
    pg_url: str,
) -> None:
    """The held connection's path drops everything (nothing is closed, no reset comes): the
    batch on it fails at the wait's limit (a 503 to its senders), its connection is closed with
    it, and the next batch goes over a new one. Kept, it would wait for the kernel's ~15 minutes
    (TCP_USER_TIMEOUT makes that 30 s; this proxy's own kernel acknowledges, so only the
    appender's limit is tested here)."""
    host, port = pg_url.split("@", 1)[1].split("/", 1)[0].split(":")
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    engine = create_engine(via(pg_url, proxy.port))
    appender = Appender(engine, wait_s=1.0)
    writing = asyncio.create_task(appender.run())
    try:
        await appender.submit(make_delivery("before"))
        await proxy.silence()
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            await appender.submit(make_delivery("during"))
        assert time.monotonic() - started < 2
        await asyncio.wait_for(appender.submit(make_delivery("after")), timeout=5)
    finally:
        await proxy.cut()
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
        await appender.close()
        await engine.dispose()
    engine = create_engine(pg_url)
    async with engine.connect() as conn:
        keys = [e.idempotency_key for e in await read_events(conn, types=["webhook.received"])]
    await engine.dispose()
    assert keys == ["before", "after"]


async def test_an_append_transaction_left_idle_is_ended_by_the_server_and_frees_the_lock(
    pg_url: str,
) -> None:
    """A process frozen mid-batch (SIGSTOP, a paused VM): its transaction holds the append lock
    idle; the server ends it after the idle limit, and every other appender goes on."""
    frozen_engine, engine = create_engine(pg_url), create_engine(pg_url)
    frozen = HeldConnection(frozen_engine, idle_limit_s=0.5)
    appender = Appender(engine)
    writing = asyncio.create_task(appender.run())

    def freezes(conn: sa.Connection) -> None:
        append_batch(conn, [make_delivery("frozen")])
        await_only(asyncio.sleep(5))  # no statement for 5 s, the lock held

    try:
        frozen_run = asyncio.create_task(frozen.run(freezes))
        await asyncio.sleep(0.2)  # it holds the lock
        started = time.monotonic()
        await asyncio.wait_for(appender.submit(make_delivery("other")), timeout=4)
        assert time.monotonic() - started < 3
        with pytest.raises(sa.exc.DBAPIError):
            await frozen_run  # its session was ended: nothing of it was committed
    finally:
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
        await appender.close()
        await frozen.close()
        await frozen_engine.dispose()
        await engine.dispose()
    engine = create_engine(pg_url)
    async with engine.connect() as conn:
        keys = [e.idempotency_key for e in await read_events(conn)]
    await engine.dispose()
    assert keys == ["other"]
