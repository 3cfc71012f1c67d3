"""Several `hookledger serve` processes sharing one database."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from conftest import AUTH
from processes import start_server

from ledger.store import create_engine, read_events


async def test_racing_duplicates_across_two_processes_execute_once(
    database_url: str, tmp_path: Path
) -> None:
    servers = [
        await start_server(database_url, tmp_path),
        await start_server(database_url, tmp_path),
    ]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                servers[0].url + "/api/triggers", json={"id": "t"}, headers=AUTH
            ) as r:
                assert r.status == 201
            await asyncio.sleep(1.2)  # the other process's trigger cache (1 s) sees it

            async def send(i: int) -> int:
                url = servers[i % 2].url + "/webhooks/t"
                headers = {"Content-Type": "application/json", "Idempotency-Key": "race"}
                async with session.post(url, data="{}", headers=headers) as response:
                    return response.status

            statuses = await asyncio.gather(*(send(i) for i in range(50)))
    finally:
        for server in servers:
            server.stop()
    assert sorted(statuses) == [200] * 49 + [202]
    engine = create_engine(database_url)
    async with engine.connect() as conn:
        events = await read_events(
            conn, limit=1000, types=["webhook.received", "webhook.duplicate"]
        )
    await engine.dispose()
    assert [e.type for e in events].count("webhook.received") == 1
    assert [e.type for e in events].count("webhook.duplicate") == 49


async def test_serve_prints_the_token_once_and_keeps_it(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from processes import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKLEDGER_")}
    outputs = []
    for _ in range(2):
        port = free_port()
        process = subprocess.Popen(  # noqa: S603, ASYNC220 - only forks
            [sys.executable, "-m", "server", "serve", "--port", str(port), "--no-dispatch"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert process.stdout is not None
        lines = []
        while not lines or b"destinations" not in lines[-1]:
            line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
            assert line, b"".join(lines)
            lines.append(line)
        process.terminate()
        process.wait(10)
        process.stdout.close()
        outputs.append(b"".join(lines).decode())
    token = (tmp_path / "hookledger.token").read_text().strip()
    assert (tmp_path / "hookledger.db").exists()
    assert f"#token={token}" in outputs[0]
    assert token not in outputs[1]
