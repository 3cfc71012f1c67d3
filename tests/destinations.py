"""A real local destination for dispatch tests: an aiohttp server on 127.0.0.1 that answers each
execution (told apart by `webhook-id`) by a programmed script, and counts what it received.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import AUTH

Client = TestClient[Any, Any]
TERMINAL = ("succeeded", "dead_lettered")


@dataclass(frozen=True, slots=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    body: bytes = b"ok"


@dataclass(frozen=True, slots=True)
class Hang:
    """Take the request and never answer (until the test ends)."""


@dataclass(frozen=True, slots=True)
class EndlessBody:
    """Answer 200 and stream a body that never ends."""


Step = Reply | Hang | EndlessBody


@dataclass(frozen=True, slots=True)
class Received:
    path: str
    message_id: str
    headers: dict[str, str]
    body: bytes
    at: float


class Destination:
    """Scripts by path: the n-th request of one execution gets step n (the last one repeats)."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[Step]] = {}
        self.received: list[Received] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrived = asyncio.Event()
        self._release = asyncio.Event()
        self.server: TestServer | None = None

    def script(self, path: str, *steps: Step) -> str:
        self.scripts[path] = list(steps)
        return self.url(path)

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def count(self, message_id: str) -> int:
        return sum(1 for r in self.received if r.message_id == message_id)

    def counts(self) -> Counter[str]:
        return Counter(r.message_id for r in self.received)

    def of(self, message_id: str) -> list[Received]:
        return [r for r in self.received if r.message_id == message_id]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        message_id = request.headers.get("webhook-id", "")
        body = await request.read()
        steps = self.scripts.get(request.path, [Reply()])
        step = steps[min(self.count(message_id), len(steps) - 1)]
        self.received.append(
            Received(request.path, message_id, dict(request.headers), body, time.monotonic())
        )
        self.arrived.set()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request, step)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, step: Step) -> web.StreamResponse:
        if isinstance(step, Hang):
            await self._release.wait()
            return web.Response(status=200)
        if isinstance(step, EndlessBody):
            response = web.StreamResponse(status=200)
            await response.prepare(request)
            while not self._release.is_set():
                await response.write(b"x" * 16384)
                await asyncio.sleep(0.001)
            return response
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        return web.Response(status=step.status, headers=step.headers, body=step.body)

    def release(self) -> None:
        self._release.set()


async def start_destination(aiohttp_server: Any) -> AsyncIterator[Destination]:
    destination = Destination()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", destination.handle)
    destination.server = await aiohttp_server(app)  # TestServer cancels handlers on close
    try:
        yield destination
    finally:
        destination.release()


def closed_port() -> int:
    """A local port nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def hanging_tcp_server() -> tuple[asyncio.Server, int]:
    """Accepts connections, reads, never writes a byte: a destination that hangs below HTTP."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
        finally:
            writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def send(client: Client, trigger: str, body: str = '{"n": 1}', **headers: str) -> str:
    merged = {"Content-Type": "application/json"} | {
        k.replace("_", "-"): v for k, v in headers.items()
    }
    response = await client.post(f"/webhooks/{trigger}", data=body, headers=merged)
    assert response.status == 202, await response.text()
    return str((await response.json())["execution_id"])


async def execution(client: Client, execution_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/executions/{execution_id}", headers=AUTH)
    assert response.status == 200, await response.text()
    return await response.json()  # type: ignore[no-any-return]


async def wait_until(
    client: Client,
    execution_id: str,
    statuses: tuple[str, ...] = TERMINAL,
    *,
    within_s: float = 15.0,
) -> dict[str, Any]:
    """Poll the execution until its status is one of `statuses`; fail at the deadline."""
    deadline = time.monotonic() + within_s
    while True:
        response = await client.get(f"/api/executions/{execution_id}", headers=AUTH)
        # 404 until the projection has folded the delivery in (it follows the log asynchronously).
        row = await response.json() if response.status == 200 else {"status": response.status}
        if row["status"] in statuses:
            return row
        assert time.monotonic() < deadline, f"still {row['status']} after {within_s} s: {row}"
        await asyncio.sleep(0.05)


def types(row: dict[str, Any]) -> list[str]:
    return [event["type"] for event in row["events"]]
