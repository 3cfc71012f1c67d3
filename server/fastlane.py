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
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import typing
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus

import httptools
import orjson
from aiohttp.helpers import parse_content_type
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_parser import SINGLETON_HEADERS
from aiohttp.tcp_helpers import tcp_nodelay

from server.errors import documented, error_body
from server.logs import fact, request_id, request_id_for
from server.ratelimit import RateLimiter
from server.receiver import Head, Receipt, count_answer, receive, within_body_timeout
from server.state import Services

__all__ = ["HEAD_TIMEOUT_RESPONSE", "LINGERING_S", "Deadline", "FastLane"]

logger = logging.getLogger(__name__)

# After an answer given before the body was read whole (a body's 408), the connection goes on
# reading and dropping what comes this long, so the sender can read the answer; then it closes.
LINGERING_S = 2.0

# Written straight to the socket: no request exists when the head never completed.
_HEAD_TIMEOUT_BODY = orjson.dumps(
    {"error": {"code": "request_timeout", "message": "the request head took too long"}}
)
HEAD_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_HEAD_TIMEOUT_BODY)
) + _HEAD_TIMEOUT_BODY

# aiohttp's limits on a head (RequestHandler's defaults): a head beyond them is aiohttp's to refuse.
MAX_LINE = 8190
MAX_HEADERS = 128
MAX_HEAD_BYTES = 2 * MAX_LINE + 64  # unfinished and this long: aiohttp's (it answers 431)
MAX_QUEUED = 16  # pipelined requests waiting for their answer before reading pauses

_PATH = re.compile(rb"/webhooks/([A-Za-z0-9_~-][A-Za-z0-9._~-]*)(?:\?[^#]*)?")
_HANDED_OVER = frozenset([b"transfer-encoding", b"content-encoding", b"expect", b"upgrade"])
# Headers aiohttp refuses to see twice (400): such a request is aiohttp's to refuse.
_SINGLETONS = frozenset(name.encode() for name in SINGLETON_HEADERS)
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


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # as aiohttp decodes header names and values


def _plain_headers(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes] | None:
    """Each header's first value by lower-case name, when the head is plain enough for the lane;
    None when it is aiohttp's: a name or value over its limit, a body encoded or to be continued
    (Expect), an upgrade, a singleton header repeated (aiohttp's 400), no Host (HTTP/1.1's 400)."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if len(name) > MAX_LINE or len(value) > MAX_LINE:
            return None
        lower = name.lower()
        if lower in _HANDED_OVER:
            return None
        if lower not in found:
            found[lower] = value
        elif lower in _SINGLETONS:
            return None
    return found if b"host" in found else None


class _Handover(Exception):  # noqa: N818 - a signal to stop the parser, not an error
    """Raised from a parser callback: this request is aiohttp's."""


class _Misframed(Exception):  # noqa: N818
    """A request's bytes are not where its head and Content-Length put them (cannot happen:
    llhttp framed it by the same rules)."""


class Deadline:
    """A deadline moved often and cheaply (one per request head): one timer, moved lazily —
    when it fires before the deadline, it is set again for it. `on_due` runs once it is over."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_due: Callable[[], None]) -> None:
        self._loop = loop
        self._on_due = on_due
        self.due: float | None = None  # loop time; None: disarmed
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, timeout_s: float) -> None:
        due = self.due = self._loop.time() + timeout_s
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._fire, due)

    def disarm(self) -> None:
        self.due = None

    def cancel(self) -> None:
        self.due = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self, set_for: float) -> None:
        self._timer = None
        due = self.due
        if due is None:
            return
        if due > set_for:  # moved since this timer was set
            self._timer = self._loop.call_at(due, self._fire, due)
            return
        self.due = None
        self._on_due()


class _Request:
    """A webhook POST whose head is complete; its body arrives behind it."""

    __slots__ = ("_waiter", "body", "head", "keep_alive", "parts", "path", "request_id")

    def __init__(self, head: Head, path: str, rid: str | None, keep_alive: bool) -> None:
        self.head = head
        self.path = path
        self.request_id = rid
        self.keep_alive = keep_alive
        self.parts: list[bytes] = []
        self.body: bytes | None = None  # once complete
        self._waiter: asyncio.Future[bytes] | None = None

    def complete(self) -> None:
        self.body = b"".join(self.parts)
        self.parts = []
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(self.body)

    def fail(self, exc: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    async def read(self, timeout_s: float) -> bytes:
        if self.body is not None:
            return self.body
        # Still arriving: `complete` gives it to the waiter, if it comes in time.
        self._waiter = asyncio.get_running_loop().create_future()
        return await within_body_timeout(self._waiter, timeout_s)


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


class Connection(asyncio.Protocol):
    """One connection in the fast lane, until it is handed to aiohttp."""

    def __init__(self, lane: FastLane) -> None:
        self._lane = lane
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._stream = bytearray()  # received, from the first byte of the first unfinished request
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._request: _Request | None = None  # the one whose body is arriving
        self._in_head = False  # a head has begun and is not complete
        self._queue: deque[_Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self._handing_over = False
        self._closing = False  # closing after the answer under way
        self._discarding = False  # answered and closing: what still comes is dropped
        self._paused = False  # reading
        self._writing_paused = False  # the sender does not read its answers
        self._head = Deadline(self._loop, self._on_head_deadline)  # disarmed: no head is due
        self._head_begun = False

    # --- asyncio -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        tcp_nodelay(self._transport, True)  # as aiohttp: an answer is one small write
        self._lane.connections.add(self)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lane.connections.discard(self)
        self._transport = None
        self._head.cancel()
        if self._request is not None:
            self._request.fail(ConnectionResetError("the connection was lost"))
        if self.task is not None:
            self.task.cancel()  # as aiohttp's handler_cancellation: nobody is there to answer

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._stream += data
        if self._handing_over:
            return  # read pauses; what came meanwhile goes to aiohttp with the rest
        if self._head.due is not None:
            self._head_begun = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Misframed):
                logger.error("evt=fast_lane_misframed", exc_info=exc.__context__)
                self.abort()
            else:
                self._hand_over()  # the request is aiohttp's, or aiohttp refuses it
            return
        if self._in_head and len(self._stream) > MAX_HEAD_BYTES:
            self._hand_over()  # aiohttp answers a head this long (431)

    def pause_writing(self) -> None:  # the sender does not read its answers: stop reading
        self._writing_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if len(self._queue) < MAX_QUEUED:
            self._resume()

    # --- llhttp's callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        request = self._webhook()
        if request is None:
            raise _Handover
        self._head.disarm()
        self._request = request
        self._queue.append(request)
        if self.task is None:
            self.task = self._loop.create_task(self._serve())
        if len(self._queue) >= MAX_QUEUED:
            self._pause()

    def on_body(self, body: bytes) -> None:
        assert self._request is not None
        self._request.parts.append(body)

    def on_message_complete(self) -> None:
        request = self._request
        assert request is not None and request.head.content_length is not None
        request.complete()
        self._request = None
        # Drop this request's bytes: its head through the blank line, then its body.
        stream = self._stream
        start = 0
        while stream[start : start + 2] == b"\r\n":  # llhttp skips empty lines before a request
            start += 2
        end = stream.find(b"\r\n\r\n", start) + 4 + request.head.content_length
        if end < 4 or bytes(stream[end - request.head.content_length : end]) != request.body:
            raise _Misframed
        del stream[:end]
        if self.task is None and not self._queue and not self._closing:
            self._arm_head_deadline()  # it was answered before its body was all in

    # --- the lane ---------------------------------------------------------------------------------

    def _webhook(self) -> _Request | None:
        """The request whose head is complete, when it is the lane's; None: aiohttp's."""
        parser = self._parser
        if (
            parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or parser.should_upgrade()
            or len(self._url) > MAX_LINE
            or len(self._headers) > MAX_HEADERS
        ):
            return None
        match = _PATH.fullmatch(self._url)
        if match is None:
            return None
        found = _plain_headers(self._headers)
        if found is None:
            return None
        length = found.get(b"content-length", b"")
        if not length.isdigit() or int(length) > self._lane.services.settings.max_body_bytes:
            return None
        items = [(_text(name), _text(value)) for name, value in self._headers]
        content_type = found.get(b"content-type")
        rid = found.get(b"x-request-id")
        media_type = parse_content_type(_text(content_type))[0] if content_type else None
        head = Head(
            trigger_id=match[1].decode(),
            content_length=int(length),
            media_type=media_type or "application/octet-stream",
            items=items,
        )
        path = self._url.partition(b"?")[0].decode()
        return _Request(head, path, None if rid is None else _text(rid), parser.should_keep_alive())

    async def _serve(self) -> None:
        """Answer the queued requests in order, one at a time."""
        try:
            while self._queue:
                try:
                    answer, close = await self._lane.answer(self._queue[0])
                except Exception:  # a defect: the answer could not even be made
                    logger.exception("evt=fast_lane_failed")
                    self.abort()
                    return
                request = self._queue.popleft()
                if self._transport is None:
                    return
                self._transport.write(answer)
                if close:
                    self._close_after(request)
                    return
                if len(self._queue) < MAX_QUEUED:
                    self._resume()
        finally:
            self.task = None
        if self._handing_over:
            self._switch()
        elif self._closing:
            self.abort()
        elif self._request is None:  # the next head is due (its bytes may have begun to come)
            self._arm_head_deadline()
        # else the body of a request answered early (a 404 from its head) is still arriving:
        # the next head is due once it is in (on_message_complete).

    def _close_after(self, request: _Request) -> None:
        transport = self._transport
        assert transport is not None
        self._queue.clear()
        if request.body is not None:  # read whole: nothing left unread to reset the connection
            transport.close()
            return
        self._discarding = True  # read on, and drop, for the sender to see the answer
        self._loop.call_later(LINGERING_S, transport.close)

    def _hand_over(self) -> None:
        """This request is aiohttp's: hand it the connection once the answers before are out."""
        self._handing_over = True
        self._pause()
        self._head.disarm()
        if self.task is None:
            self._switch()

    def _switch(self) -> None:
        transport = self._transport
        if transport is None:
            return
        self._lane.connections.discard(self)
        self._head.cancel()
        handler = self._lane.aiohttp_protocol()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._writing_paused:
            handler.pause_writing()  # aiohttp resumes reading when its writes may go on
        if self._paused:
            transport.resume_reading()
        pending, self._stream = bytes(self._stream), bytearray()
        self._transport = None
        if pending:
            handler.data_received(pending)

    def _pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if (
            self._paused
            and not self._writing_paused
            and not self._handing_over
            and self._transport is not None
        ):
            self._paused = False
            self._transport.resume_reading()

    def close_when_idle(self) -> None:
        self._closing = True
        if self.task is None:
            self.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # --- the head deadline ----------------------------------------------------------------------

    def _arm_head_deadline(self) -> None:
        timeout_s = self._lane.header_timeout_s
        if timeout_s <= 0 or self._transport is None:
            return
        self._head_begun = bool(self._stream)
        self._head.arm(timeout_s)

    def _on_head_deadline(self) -> None:
        if self._transport is None:
            return
        if self._head_begun:
            fact(logger, "header_timeout", timeout_s=self._lane.header_timeout_s)
            self._transport.write(HEAD_TIMEOUT_RESPONSE)
        self._transport.close()
