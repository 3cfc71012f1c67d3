"""The HTTP listener `hookledger serve` runs: the fast lane for webhook POSTs (server/fastlane.py)
in front of aiohttp's server, which gets every other request; a header deadline on both; and the
protocol's own errors (bad request line, too many or too long headers) in the API's error shape.
Bodies are not decoded by aiohttp here (`auto_decompress=False`): server/codings.py does it.

aiohttp bounds a request head's size, not the time it takes: a client trickling a byte a second
would hold its connection for ever. Here a connection must deliver a complete request head within
`header_timeout_s` of connecting or of its previous response; else it is answered 408 (when it had
begun a request) and closed, while every other connection is served as usual.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from server.config import Settings
from server.deadlines import HEAD_TIMEOUT_RESPONSE, LINGERING_S, Deadline
from server.errors import error_response
from server.fastlane import FastLane
from server.logs import fact
from server.ratelimit import INGEST_LIMITER
from server.state import SERVICES

__all__ = ["LINGERING_S", "GuardedAppRunner", "bind", "make_runner", "start_site"]

logger = logging.getLogger(__name__)


def _protocol_error(exc: BaseException | None) -> tuple[int, str, str]:
    """Status, code and message for a request aiohttp's parser refused."""
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "too many headers" in exc.message.lower()
    ):
        return 431, "headers_too_large", "the request line or headers are too long or too many"
    return 400, "bad_request", "the request is not well-formed HTTP/1.1"


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol, with a deadline on each request head."""

    def __init__(self, manager: web.Server, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        # When the next head is due (disarmed while a request is being served).
        self._head = Deadline(self._loop, self._on_header_deadline)
        self._head_begun = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._head.disarm()
        elif self._head.due is not None and data:
            self._head_begun = True

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if not self._messages:  # the next head, on a kept-alive connection, gets its own deadline
            self._arm_header_deadline()
        return result

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs the cause
            response = error_response(
                status, "internal_error", "an internal error occurred; it has been logged"
            )
            response.force_close()
            return response
        status, code, text = _protocol_error(exc)
        # Non-HTTP traffic (scanners, TLS to a plain port) is routine on a public port.
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
        fact(logger, "bad_http_request", level, status=status, code=code, peer=request.remote)
        if request.writer.output_size > 0:
            raise ConnectionError("a response is already under way; closing instead")
        response = error_response(status, code, text)
        response.force_close()
        return response

    def _arm_header_deadline(self) -> None:
        if self._header_timeout_s <= 0:
            return
        self._head_begun = False
        self._head.arm(self._header_timeout_s)

    def _on_header_deadline(self) -> None:
        is_waiting_for_head = self._waiter is not None and not self._waiter.done()
        if not is_waiting_for_head:
            # Still busy with the previous request (e.g. draining its body): look again later.
            self._arm_header_deadline()
            return
        if self._head_begun and self.transport is not None:
            fact(logger, "header_timeout", timeout_s=self._header_timeout_s)
            self.transport.write(HEAD_TIMEOUT_RESPONSE)
        self.force_close()


class _GuardedServer(web.Server):
    def __init__(self, plain: web.Server, header_timeout_s: float) -> None:
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
        self._header_timeout_s = header_timeout_s
        self.lane: FastLane | None = None  # set by the runner: new connections start in it

    def __call__(self) -> RequestHandler:  # or the fast lane's: any protocol will do
        if self.lane is not None:
            return self.lane()  # type: ignore[return-value]
        return self.handler()

    def handler(self) -> RequestHandler:
        """A new aiohttp connection (the fast lane's hand-over makes them too)."""
        return GuardedRequestHandler(
            self, loop=self._loop, header_timeout_s=self._header_timeout_s, **self._kwargs
        )


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose connections start in the fast lane and go on in GuardedRequestHandler."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        server = _GuardedServer(await super()._make_server(), self._header_timeout_s)
        app = self.app
        server.lane = FastLane(
            app[SERVICES], app[INGEST_LIMITER], server.handler, self._header_timeout_s
        )
        return server

    async def shutdown(self) -> None:
        await super().shutdown()
        server = self.server
        if isinstance(server, _GuardedServer) and server.lane is not None:
            await server.lane.stop(self._shutdown_timeout)  # its answers before the app's cleanup


def make_runner(app: web.Application, settings: Settings) -> GuardedAppRunner:
    """The runner of `hookledger serve`'s listener (the tests serve the app with it too)."""
    return GuardedAppRunner(
        app,
        header_timeout_s=settings.header_timeout_s,
        access_log=None,
        handler_cancellation=True,
        # After an answer given before the body was read whole (413, 401, a body's 408), aiohttp
        # goes on reading and dropping it this long so the sender can read the answer; then it
        # closes. Its default, 10 s, would hold a trickler that long again.
        lingering_time=LINGERING_S,
        # Bodies are decoded by server/codings.py, which refuses one cut short (aiohttp's own
        # decoding took a gzip stream as far as it went for the whole).
        auto_decompress=False,
    )


async def start_site(
    app: web.Application, settings: Settings, *, host: str, port: int, reuse_port: bool = False
) -> GuardedAppRunner:
    """Run `app` on host:port the way `hookledger serve` does; the caller cleans the runner up."""
    runner = make_runner(app, settings)
    await runner.setup()
    await bind(runner, host=host, port=port, reuse_port=reuse_port)
    return runner


async def bind(runner: web.AppRunner, *, host: str, port: int, reuse_port: bool = False) -> None:
    """Listen on host:port with a runner already set up (its app's database opened)."""
    # reuse_port: the processes of one `serve --workers N` share the port (server/ingest.py).
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None)
    await site.start()
