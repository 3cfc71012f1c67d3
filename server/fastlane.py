"""The listener's fast lane: a plain webhook POST parsed with llhttp and answered with the bytes of
its answer; any other request handed, with its connection, to aiohttp.

Why: aiohttp's request and response objects, router, middleware and task per request cost about
four times what parsing the head with llhttp (httptools) and writing the answer's bytes do
(bench/README.md), and a webhook's answer is small and always of the same shape.

What is unusual is not handled here. When a request is anything but a plain webhook POST —
another method or path, no Content-Length or a body over the limit, a body chunked or encoded,
`Expect`, an upgrade, HTTP/1.0, a head aiohttp would refuse, bytes llhttp cannot parse — the
connection is handed to aiohttp (server/listener.py) from that request's first byte, for the rest
of its life, once the answers before it are out. So every edge of HTTP keeps aiohttp's behaviour.
To know where a request begins, the lane keeps the bytes of the requests it has not finished and
drops each one's exact length (head through its blank line, then Content-Length) once complete.

The receiver itself (checks, append, answer after commit) is server.receiver.receive, shared with
aiohttp's route; errors take the documented shape through server.errors.documented, and answers
are counted and logged as there (server.receiver.count_answer).

Requests on one connection are answered in order, one at a time: pipelined ones wait their turn.
A connection must complete each request head within the header timeout, as on aiohttp's side; a
body must arrive within the body timeout (the receiver's 408, then the connection is closed).

Here: the lane (`FastLane`) and the bytes of its answers. A connection is
server/fastlane_connection.py; which requests are the lane's, server/fastlane_requests.py; the
deadlines both lanes keep, server/deadlines.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus

from aiohttp.http import SERVER_SOFTWARE

from server.errors import documented, error_body
from server.fastlane_connection import Connection
from server.fastlane_requests import _Request
from server.logs import request_id, request_id_for
from server.ratelimit import RateLimiter
from server.receiver import Receipt, count_answer, receive
from server.state import Services

__all__ = ["FastLane"]

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_SERVER = b"Server: " + SERVER_SOFTWARE.encode() + b"\r\n"
_JSON = b"Content-Type: application/json\r\n"


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._line


_DATE = _Date()


def _answer_bytes(
    status: int, body: bytes, headers: dict[str, str] | None, rid: str, close: bool
) -> bytes:
    parts = [
        _STATUS_LINES[status],
        _JSON,
        b"Content-Length: %d\r\n" % len(body),
        _DATE.line(),
        _SERVER,
        b"X-Request-Id: " + rid.encode() + b"\r\n",
    ]
    if headers:
        parts += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items()]
    if close:
        parts.append(b"Connection: close\r\n")
    parts += [b"\r\n", body]
    return b"".join(parts)


class FastLane:
    """The fast lane of one listener: its connections, and what it answers with."""

    def __init__(
        self,
        services: Services,
        limiter: RateLimiter,
        aiohttp_protocol: Callable[[], asyncio.Protocol],
        header_timeout_s: float,
    ) -> None:
        self.services = services
        self.limiter = limiter
        self.aiohttp_protocol = aiohttp_protocol  # a new aiohttp connection (GuardedRequestHandler)
        self.header_timeout_s = header_timeout_s
        self.connections: set[Connection] = set()
        self._stopping = False

    def __call__(self) -> asyncio.Protocol:
        if self._stopping:
            return self.aiohttp_protocol()  # aiohttp refuses it as it stops
        return Connection(self)

    async def answer(self, request: _Request) -> tuple[bytes, bool]:
        """The answer's bytes, and whether to close the connection after it."""
        rid = request_id_for(request.request_id)
        token = request_id.set(rid)
        receipt = Receipt()
        services = self.services
        try:
            try:
                answer = await receive(
                    services,
                    self.limiter,
                    request.head,
                    lambda: request.read(services.settings.body_timeout_s),
                    receipt,
                )
                status, body, headers, close = answer.status, answer.body, answer.headers, False
                code = "duplicate" if status == 200 else ""
            except Exception as exc:  # noqa: BLE001 - documented() shapes any error
                error = documented(exc, request.path)
                status, headers, close, code = error.status, error.headers, error.close, error.code
                body = error_body(error.code, error.message)
            count_answer(services.metrics, receipt, request.head.trigger_id, status, code)
        finally:
            request_id.reset(token)
        close = close or not request.keep_alive or self._stopping
        return _answer_bytes(status, body, headers, rid, close), close

    async def stop(self, timeout_s: float) -> None:
        """Stop: idle connections close now; the others after the answer they owe, or when
        `timeout_s` is over."""
        self._stopping = True
        for connection in list(self.connections):
            connection.close_when_idle()
        busy = [c.task for c in self.connections if c.task is not None]
        if busy:
            await asyncio.wait(busy, timeout=timeout_s)
        for connection in list(self.connections):
            connection.abort()
