"""Every process sharing a database seals and opens secrets with one key (server/secretkey.py).

A process with another key could open none of the triggers' secrets and would answer every
signed delivery with 401; it refuses to start instead, and says which key it had.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from conftest import AUTH, MakeClient, create_trigger, serve_app
from processes import free_port, start_server
from signing import sign
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.errors import SecretKeyMismatch
from ledger.migrate import upgrade
from ledger.schema import secret_key_check
from ledger.store import create_engine
from ledger.vault import Vault, load_or_create_key
from server.app import make_app
from server.catalog import TriggerCache
from server.config import Settings
from server.secretkey import check_secret_key

SECRET = "s3cret-of-the-sender"


async def _recorded(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.select(secret_key_check.c.fingerprint))).scalars())


async def test_the_first_start_records_its_key_and_another_key_is_refused(
    engine: AsyncEngine,
) -> None:
    first, other = Vault("key-a"), Vault("key-b")
    await check_secret_key(engine, first, "A")
    await check_secret_key(engine, first, "A")  # a restart with the same key
    with pytest.raises(SecretKeyMismatch, match=r"\(B\)"):
        await check_secret_key(engine, other, "B")
    # Refused before any secret was stored: two hosts starting on an empty database with
    # their own key files cannot each seal secrets the other cannot open.
    assert await _recorded(engine) == [first.fingerprint]
    assert first.fingerprint != other.fingerprint
    assert "key-a" not in first.fingerprint


async def test_first_starts_racing_on_one_database_agree_on_one_key(database_url: str) -> None:
    engines = [create_engine(database_url) for _ in range(6)]
    try:
        await upgrade(engines[0])
        keys = [Vault("key-a"), Vault("key-b")] * 3
        outcomes = await asyncio.gather(
            *(
                check_secret_key(e, key, str(n))
                for n, (e, key) in enumerate(zip(engines, keys, strict=True))
            ),
            return_exceptions=True,
        )
        recorded = await _recorded(engines[0])
    finally:
        for engine in engines:
            await engine.dispose()
    assert len(recorded) == 1
    for key, outcome in zip(keys, outcomes, strict=True):
        if key.fingerprint == recorded[0]:
            assert outcome is None
        else:
            assert isinstance(outcome, SecretKeyMismatch)


async def test_a_database_with_secrets_and_no_recorded_key_is_checked_against_them(
    aiohttp_client: MakeClient, settings: Settings, database_url: str
) -> None:
    # A database from before the check (migration 0006): secrets sealed, no fingerprint.
    client = await serve_app(aiohttp_client, make_app(settings), "aiohttp")
    await create_trigger(client, id="signed", secret=SECRET)
    await client.close()
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.delete(secret_key_check))
        with pytest.raises(SecretKeyMismatch):
            await check_secret_key(engine, Vault("another-key"), "another")
        assert await _recorded(engine) == []  # nothing recorded for the key that cannot open
        right = Vault(settings.resolved_secret_key())
        await check_secret_key(engine, right, "the right one")
        assert await _recorded(engine) == [right.fingerprint]
    finally:
        await engine.dispose()


async def test_a_server_with_another_key_refuses_to_start_and_names_its_key(
    database_url: str, tmp_path: Path
) -> None:
    first = await start_server(database_url, tmp_path, "--no-dispatch")
    try:
        started = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "server", "serve", "--port", str(free_port())],
            cwd=tmp_path,
            env=os.environ
            | {"HOOKLEDGER_DATABASE_URL": database_url, "HOOKLEDGER_SECRET_KEY": "?"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert started.returncode == 1, started.stdout + started.stderr
        assert "sealed with another key" in started.stderr
        assert "(HOOKLEDGER_SECRET_KEY)" in started.stderr
        assert "Traceback" not in started.stderr
        async with (  # the first one serves on
            aiohttp.ClientSession() as session,
            session.get(first.url + "/readyz") as response,
        ):
            assert response.status == 200
    finally:
        first.stop()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_second_host_without_the_first_ones_key_file_is_refused_until_given_it(
    database_url: str, tmp_path: Path
) -> None:
    # On PostgreSQL the key file is made in each process's working directory: a second host (a
    # second directory here) makes its own, unless it is given the first one's.
    no_key = {"HOOKLEDGER_SECRET_KEY": ""}
    (host_a := tmp_path / "a").mkdir()
    (host_b := tmp_path / "b").mkdir()
    first = await start_server(database_url, host_a, "--no-dispatch", env=no_key)
    try:
        async with aiohttp.ClientSession() as session:
            config = {"id": "gh", "source": "github", "secret": SECRET}
            async with session.post(first.url + "/api/triggers", json=config, headers=AUTH) as r:
                assert r.status == 201, await r.text()
        with pytest.raises(RuntimeError, match="sealed with another key") as refused:
            await start_server(database_url, host_b, "--no-dispatch", env=no_key)
        assert str(host_b / ".hookledger" / "hookledger.key") in str(refused.value)
        (host_b / ".hookledger" / "hookledger.key").unlink()
        shutil.copy(host_a / ".hookledger" / "hookledger.key", host_b / ".hookledger")
        second = await start_server(database_url, host_b, "--no-dispatch", env=no_key)
        try:
            body = b'{"action": "opened"}'
            headers = sign("github", SECRET, body) | {"content-type": "application/json"}
            async with (
                aiohttp.ClientSession() as session,
                session.post(second.url + "/webhooks/gh", data=body, headers=headers) as r,
            ):
                assert r.status == 202, await r.text()
        finally:
            second.stop()
    finally:
        first.stop()


async def test_a_secret_the_key_cannot_open_is_logged_once(
    aiohttp_client: MakeClient,
    settings: Settings,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Past the start-up check (a key changed under a running process): never silent.
    client = await serve_app(aiohttp_client, make_app(settings), "aiohttp")
    await create_trigger(client, id="signed", secret=SECRET)
    await create_trigger(client, id="unsigned")
    await client.close()
    engine = create_engine(database_url)
    try:
        cache = TriggerCache(engine, Vault("another-key"))
        with caplog.at_level(logging.INFO, logger="server.catalog"):
            for _ in range(3):
                cache.forget("signed")
                signed: Any = await cache.get("signed")
                assert signed.secrets == ()  # its deliveries are refused with 401
                assert signed.requires_signature
            assert (await cache.get("unsigned")) is not None
    finally:
        await engine.dispose()
    said = [r for r in caplog.records if "secret_unavailable" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert said[0].levelno == logging.ERROR
    assert said[0].fields == {"trigger_id": "signed", "secrets": 1}  # type: ignore[attr-defined]


def _load_together(path: Path, callers: int) -> list[str]:
    start = threading.Barrier(callers)

    def load(_: int) -> str:
        start.wait()
        return load_or_create_key(path)

    with ThreadPoolExecutor(callers) as pool:
        return list(pool.map(load, range(callers)))


def test_starts_creating_the_key_file_together_all_read_the_one_key(tmp_path: Path) -> None:
    # The file used to be created empty, then written: a process starting in between read ""
    # as its key (secrets sealed under a key anyone can derive, and a fingerprint no later
    # start matches) or failed on the exclusive create.
    for attempt in range(100):
        keys = _load_together(tmp_path / str(attempt) / "hookledger.key", 4)
        assert len(set(keys)) == 1, keys
        assert keys[0], keys


def test_an_empty_key_file_is_refused_in_a_line(tmp_path: Path) -> None:
    # An older version could leave the file empty (made, then written, while another start read
    # it): the key "" would seal secrets anyone can open.
    (tmp_path / "hookledger.key").write_text("")
    database_url = f"sqlite:///{tmp_path / 'hookledger.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKLEDGER_")}
    started = subprocess.run(  # noqa: S603 - our own command, with arguments of this test's
        [sys.executable, "-m", "server", "triggers", "list", "--database-url", database_url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 1, started.stdout + started.stderr
    assert started.stderr.startswith("error: the key file ") and "is empty" in started.stderr
    assert "Traceback" not in started.stderr
