"""The database goes away: the receiver answers 503 with Retry-After, stores nothing it did not
acknowledge, and recovers by itself. PostgreSQL only, through a proxy this test controls (the
shared server is never stopped)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from aiohttp.test_utils import TestClient
from conftest import create_trigger
from tcpproxy import TcpProxy

from ledger.store import create_engine, read_events
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
