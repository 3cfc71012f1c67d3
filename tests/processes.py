"""Real `hookledger serve` processes for tests that need more than one server, or a kill."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from conftest import ADMIN_TOKEN, AUTH


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


async def start_server(
    database_url: str,
    workdir: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
    before: Sequence[str] = (),
) -> ServerProcess:
    """`hookledger [before…] serve --port P [args…]` in `workdir`, on `database_url` (by the
    environment: an option given in `before` or `args` wins over it); `preexec` runs in the
    child before it starts (limits)."""
    port = free_port()
    log = workdir / f"serve-{port}.log"
    # It runs the code beside these tests: conftest puts this checkout on PYTHONPATH.
    environment = (
        os.environ
        | {
            "HOOKLEDGER_DATABASE_URL": database_url,
            "HOOKLEDGER_ADMIN_TOKEN": ADMIN_TOKEN,
            "HOOKLEDGER_SECRET_KEY": "test-secret-key",
            "HOOKLEDGER_LOG_FORMAT": "json",
        }
        | dict(env or {})
    )
    with log.open("wb") as out:
        # Popen only forks: it does not wait, so it may run on the loop. noqa: the same reason.
        process = subprocess.Popen(  # noqa: S603, ASYNC220 - our own console script
            [sys.executable, "-m", "server", *before, "serve", "--port", str(port), *args],
            cwd=workdir,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,  # setrlimit and signal only: safe between fork and exec
        )
    server = ServerProcess(process, port, log)
    await _wait_ready(server)
    return server


async def register(session: aiohttp.ClientSession, server: ServerProcess, trigger_id: str) -> None:
    """A trigger `trigger_id` (generic, no secret) on `server`, through its admin API."""
    body = {"id": trigger_id}
    async with session.post(server.url + "/api/triggers", json=body, headers=AUTH) as r:
        assert r.status == 201, await r.text()


async def _wait_ready(server: ServerProcess, wait_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + wait_s
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited: {server.log.read_text()[-2000:]}")
            try:
                async with session.get(server.url + "/healthz") as response:
                    # Up, and said so: with ingest workers the port answers before the main
                    # process, which prints its line once every worker listens.
                    if (
                        response.status == 200
                        and b"hookledger listening on" in server.log.read_bytes()
                    ):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not start: {server.log.read_text()[-2000:]}")
