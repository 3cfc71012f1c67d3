"""The ledger link: how an ingest worker (server/ingest.py) reaches the main process's one
appender — a UNIX socket in a directory only the server's user can open, both ends here.

It carries pickled frames (a 4-byte length, then `(kind, id, payload)`): commands and their
results are the ledger's own dataclasses, except the one sent most, a delivery, and its outcome:
they cross as tuples of their fields (`_DELIVERY`), which pickle several times faster than frozen
dataclasses. Pickle is safe here because only the server's user can reach the socket, and that
user can write the database file anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import struct
import typing
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ledger.commands import Command, DeliveryOutcome, RecordDelivery
from ledger.errors import LedgerError, StorageUnavailable
from ledger.fields import Fields
from server.metrics import Metrics

logger = logging.getLogger(__name__)

_HEAD = struct.Struct("!I")
APPEND, DELIVERY, COUNT, METRICS, READY = "append", "delivery", "count", "metrics", "ready"
COMMITTED = 0  # the id of a notice from the main process: its appender committed a batch

_DELIVERY = Fields(RecordDelivery)  # a few strings: the event is encoded by the worker
OUTCOME = Fields(DeliveryOutcome)
delivery_fields = _DELIVERY.of  # a delivery as a DELIVERY frame carries it


def frame(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEAD.pack(len(body)) + body


def unframe(buffer: bytearray) -> list[tuple[Any, ...]]:
    """The messages of the whole frames at the start of `buffer`, taken out of it (a frame
    still arriving stays)."""
    start, messages = 0, []
    while len(buffer) - start >= _HEAD.size:
        (size,) = _HEAD.unpack_from(buffer, start)
        end = start + _HEAD.size + size
        if len(buffer) < end:
            break
        messages.append(pickle.loads(memoryview(buffer)[start + _HEAD.size : end]))  # noqa: S301 - see module doc
        start = end
    del buffer[:start]
    return messages


class _Framed(asyncio.Protocol):
    """Length-prefixed pickled frames both ways; what one loop turn writes goes out in one
    write (a batch of answers is one syscall, not one each)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        # The loop the link runs on, found once: asyncio.get_running_loop() makes a getpid()
        # system call each time (its fork check), and a worker sent one a request.
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        # Taken out before any is handled: none is ever handled twice.
        for message in unframe(self._buffer):
            self.message_received(message)

    def message_received(self, message: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def send(self, message: tuple[Any, ...]) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        if not self._out:
            (self._loop or asyncio.get_running_loop()).call_soon(self.flush)
        self._out.append(frame(message))

    def flush(self) -> None:
        """Write what was sent since the last write (by the end of the loop's turn at the
        latest)."""
        out, self._out = self._out, []
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))


# --- the main process's end ----------------------------------------------------------------


def _result_of(done: asyncio.Future[Any]) -> Any:
    """A finished future's result, or its error (an exception, as the appender hands them)."""
    if done.cancelled():
        return RuntimeError("cancelled")
    return done.exception() or done.result()


def _portable(exc: BaseException) -> BaseException:
    """`exc` as the worker can unpickle and answer it: the ledger's own errors as they are (an
    outage's cause as text), anything else as a RuntimeError that says what it was."""
    if isinstance(exc, StorageUnavailable):
        return StorageUnavailable(RuntimeError(f"{type(exc.cause).__name__}: {exc.cause}"))
    if isinstance(exc, LedgerError):
        with contextlib.suppress(Exception):
            pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own bytes
            return exc
    return RuntimeError(f"{type(exc).__name__}: {exc}")


class _LedgerSide(_Framed):
    def __init__(
        self,
        enqueue: Callable[[Command, Callable[[Any], None]], None],
        metrics: Metrics,
        page: Callable[[], Awaitable[bytes]],
        ready: Callable[[int], None],
        sides: set[_LedgerSide],
    ) -> None:
        super().__init__()
        self._enqueue = enqueue
        self._metrics = metrics
        self._page = page
        self._ready = ready
        self._sides = sides

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sides.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._sides.discard(self)

    def message_received(self, message: tuple[Any, ...]) -> None:
        kind, ident, payload = message
        if kind == DELIVERY:
            self._enqueue(
                _DELIVERY.made(payload), lambda result: self._answer(ident, result, OUTCOME.of)
            )
        elif kind == APPEND:
            self._enqueue(payload, lambda result: self._answer(ident, result))
        elif kind == COUNT:  # [(trigger_id, outcome, reason, times), …]
            for counted in payload:
                self._metrics.count_webhook(*counted)
        elif kind == METRICS:
            asyncio.ensure_future(self._page()).add_done_callback(
                lambda done: self._answer(ident, _result_of(done))
            )
        elif kind == READY:  # the worker listens on the port now
            self._ready(payload)

    def _answer(self, ident: int, result: Any, encode: Callable[[Any], Any] = lambda r: r) -> None:
        """Send a call's result (an exception for an error)."""
        if isinstance(result, BaseException):
            self.send((ident, False, _portable(result)))
        else:
            try:
                self.send((ident, True, encode(result)))
            except Exception as error:  # noqa: BLE001 - the worker must get an answer
                logger.exception("evt=ledger_link_answer_failed")
                self.send((ident, False, RuntimeError(f"{type(error).__name__}: {error}")))


class LinkServer:
    """The main process's end of the link, on a UNIX socket (mode 0600)."""

    def __init__(self, server: asyncio.AbstractServer, sides: set[_LedgerSide]) -> None:
        self._server = server
        self._sides = sides

    def committed(self, _batch_size: int = 0, _seconds: float = 0.0) -> None:
        """An appender commit listener: tell every worker, whose live feeds wake on it, and send
        it now with the commit's answers (already queued by then, `Appender.enqueue_answered`):
        the workers hear back before this loop turns to the input that came during the commit."""
        for side in self._sides:
            side.send((COMMITTED, True, None))
            side.flush()

    def close(self) -> None:
        self._server.close()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()


async def serve_link(
    path: Path,
    enqueue: Callable[[Command, Callable[[Any], None]], None],
    metrics: Metrics,
    page: Callable[[], Awaitable[bytes]],
    ready: Callable[[int], None] = lambda _pid: None,
) -> LinkServer:
    """The main process's end of the link at `path`, whose commands go to `enqueue` (an
    appender's `enqueue_answered`); `ready` is called with a worker's pid once it listens on the
    port. Add `LinkServer.committed` to the appender's commit listeners."""
    loop = asyncio.get_running_loop()
    sides: set[_LedgerSide] = set()
    server = await loop.create_unix_server(
        lambda: _LedgerSide(enqueue, metrics, page, ready, sides), str(path)
    )
    os.chmod(path, 0o600)
    return LinkServer(server, sides)


# --- a worker's end ------------------------------------------------------------------------


class LedgerLink(_Framed):
    """A worker's connection to the main process: calls answered by id."""

    def __init__(self) -> None:
        super().__init__()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.lost = asyncio.Event()
        self.committed: list[Callable[[int, float], None]] = []  # called on each COMMITTED

    @classmethod
    async def connect(cls, path: Path) -> LedgerLink:
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(cls, str(path))
        return link

    def call(self, kind: str, payload: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = (self._loop or asyncio.get_running_loop()).create_future()
        if self.lost.is_set():
            future.set_exception(_gone())
            return future
        ident = next(self._ids)
        self._pending[ident] = future
        self.send((kind, ident, payload))
        return future

    def message_received(self, message: tuple[Any, ...]) -> None:
        ident, ok, payload = message
        if ident == COMMITTED:
            for listener in self.committed:
                listener(0, 0.0)
            return
        future = self._pending.pop(ident, None)
        if future is None or future.done():
            return
        if ok:
            future.set_result(payload)
        else:
            future.set_exception(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(_gone())

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _gone() -> StorageUnavailable:
    # Nothing was acknowledged: the sender gets a 503 and retries.
    return StorageUnavailable(ConnectionError("the main hookledger process is gone"))
