"""The live event feed: `GET /api/events/stream` (Server-Sent Events) and the follower behind it.

The follower sends the backlog after a `seq`, then each event as it commits. Appends are
serialized and commit in `seq` order (ledger.store), so once the head H is visible every event up
to H is too: a follower that reads up to the head it saw never skips an event, and with a filter
it can move its cursor to H even when nothing matched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.events import RecordedEvent
from ledger.store import read_events, read_last_seq
from server.logs import fact
from server.queries import bad_query, event_json, int_param
from server.state import SERVICES

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

PAGE = 500
POLL_S = 0.5  # how soon another process's commits are seen
HEARTBEAT_S = 15.0  # proxies drop idle streams; a comment line keeps them open
RETRY_MS = 2000  # the reconnect delay suggested to clients
ERROR_BACKOFF_S = 1.0

Wait = Callable[[], Awaitable[None]]


async def follow_events(
    engine: AsyncEngine,
    *,
    after: int,
    wait: Wait,
    types: Sequence[str] | None = None,
    trigger_id: str | None = None,
    page: int = PAGE,
    follow: bool = True,
) -> AsyncIterator[list[RecordedEvent]]:
    """Pages of events after `after` in seq order: the backlog, then (`follow`) new commits.

    `wait` is awaited whenever the follower has caught up (a commit signal or a poll interval).
    """
    while True:
        async with engine.connect() as conn:
            head = await read_last_seq(conn)
            batch = await read_events(
                conn, after=after, until=head, limit=page, types=types, trigger_id=trigger_id
            )
        if batch:
            yield batch
        if len(batch) == page:
            after = batch[-1].seq
            continue
        after = max(after, head)  # every event up to head was read, matching the filter or not
        if not follow:
            return
        await wait()


class CommitSignal:
    """Wakes every open feed of this process when the appender commits (a broadcast)."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Event] = set()
        self.closing = asyncio.Event()

    def notify(self, _batch_size: int = 0, _seconds: float = 0.0) -> None:
        for waiter in self._waiters:
            waiter.set()

    @contextlib.contextmanager
    def subscription(self) -> Iterator[asyncio.Event]:
        waiter = asyncio.Event()
        self._waiters.add(waiter)
        try:
            yield waiter
        finally:
            self._waiters.discard(waiter)

    def waiter_for(self, event: asyncio.Event, poll_s: float = POLL_S) -> Wait:
        async def wait() -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_s):
                    await event.wait()
            event.clear()
            if self.closing.is_set():
                raise _Closing

        return wait


class _Closing(Exception):
    """The app shuts down: open feeds end."""


COMMITS: web.AppKey[CommitSignal] = web.AppKey("feed_commits", CommitSignal)


def _start(request: web.Request) -> int | None:
    """Where to resume: Last-Event-ID (a reconnecting client), else ?after, else the head."""
    last_id = request.headers.get("Last-Event-ID", "").strip()
    if last_id:
        # Digits alone, ASCII ones (str.isdigit takes superscripts; int() would take "+5").
        if not (last_id.isascii() and last_id.isdigit()):
            raise bad_query("Last-Event-ID must be a seq")
        # Bounded as ?after is: past what a column holds, every read of the feed would fail, and
        # the feed would say for ever that the database is unavailable.
        return int_param({"Last-Event-ID": last_id}, "Last-Event-ID", 0)
    if request.query.get("after", "") == "":
        return None
    return int_param(request.query, "after", 0)


def event_filters(types: Sequence[str], trigger_id: str | None) -> dict[str, Any]:
    """`type` may repeat and each may list several, comma-separated."""
    names = [name for value in types for name in value.split(",") if name]
    return {"types": names or None, "trigger_id": trigger_id or None}


def _filters(query: MultiMapping[str]) -> dict[str, Any]:
    return event_filters(query.getall("type", []), query.get("trigger_id"))


def sse_message(event: RecordedEvent) -> bytes:
    data = orjson.dumps(event_json(event))  # one line: orjson never writes a raw newline
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.type.encode(), data)


class _Stream:
    """One open SSE response: writes, and heartbeats while nothing happens."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self.written_at = time.monotonic()

    async def send(self, chunk: bytes) -> None:
        await self.response.write(chunk)
        self.written_at = time.monotonic()

    async def heartbeat_if_idle(self) -> None:
        if time.monotonic() - self.written_at >= HEARTBEAT_S:
            await self.send(b": keep-alive\n\n")


async def _open(request: web.Request) -> _Stream:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
        }
    )
    await response.prepare(request)
    stream = _Stream(response)
    await stream.send(b"retry: %d\n\n" % RETRY_MS)
    return stream


async def _pump(request: web.Request, stream: _Stream, after: int, filters: dict[str, Any]) -> None:
    """Send pages until the client leaves or the app shuts down; a database outage is waited out."""
    services = request.app[SERVICES]
    signal = request.app[COMMITS]
    with signal.subscription() as woken:
        pause = signal.waiter_for(woken)

        async def wait() -> None:
            await stream.heartbeat_if_idle()
            await pause()

        while True:
            try:
                async for batch in follow_events(
                    services.engine, after=after, wait=wait, **filters
                ):
                    await stream.send(b"".join(sse_message(e) for e in batch))
                    after = batch[-1].seq
            except (_Closing, ConnectionResetError):
                return
            except Exception as exc:  # noqa: BLE001 - the stream outlives a database outage
                fact(logger, "feed_read_failed", logging.WARNING, cause=repr(exc), after=after)
                await stream.send(b": database unavailable, retrying\n\n")
                await asyncio.sleep(ERROR_BACKOFF_S)


@routes.get("/api/events/stream")
async def stream_events(request: web.Request) -> web.StreamResponse:
    start = _start(request)
    filters = _filters(request.query)
    if start is None:
        async with request.app[SERVICES].engine.connect() as conn:
            start = await read_last_seq(conn)
    stream = await _open(request)
    with contextlib.suppress(ConnectionResetError):
        await _pump(request, stream, start, filters)
    return stream.response


async def _close_feeds(app: web.Application) -> None:
    app[COMMITS].closing.set()
    app[COMMITS].notify()


def setup(app: web.Application) -> None:
    """Routes, the commit broadcast (an appender listener) and the shutdown of open feeds."""
    signal = CommitSignal()
    app[COMMITS] = signal
    app[SERVICES].appender.commit_listeners.append(signal.notify)
    app.router.add_routes(routes)
    app.on_shutdown.append(_close_feeds)
