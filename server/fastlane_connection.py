"""One connection in the fast lane (server/fastlane.py): its bytes parsed by llhttp (httptools),
its webhook POSTs queued and answered in order, reading paused while the sender does not read its
answers, its head deadline, and its hand-over to aiohttp from the first byte of a request that
is not the lane's.
"""

from __future__ import annotations

import asyncio
import logging
import typing
from collections import deque

import httptools
from aiohttp.helpers import parse_content_type
from aiohttp.tcp_helpers import tcp_nodelay

from server.deadlines import HEAD_TIMEOUT_RESPONSE, LINGERING_S, Deadline
from server.fastlane_requests import (
    _PATH,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_LINE,
    _plain_headers,
    _Request,
    _text,
)
from server.logs import fact
from server.receiver import Head

if typing.TYPE_CHECKING:
    from server.fastlane import FastLane

logger = logging.getLogger(__name__)

MAX_QUEUED = 16  # pipelined requests waiting for their answer before reading pauses


class _Handover(Exception):  # noqa: N818 - a signal to stop the parser, not an error
    """Raised from a parser callback: this request is aiohttp's."""


class _Misframed(Exception):  # noqa: N818
    """A request's bytes are not where its head and Content-Length put them (cannot happen:
    llhttp framed it by the same rules)."""


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
