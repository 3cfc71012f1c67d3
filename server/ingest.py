"""Ingest workers: more processes answering HTTP on the same port, still one writer.

`hookledger serve --workers N` starts N worker processes beside itself (the main process). All
of them listen on the port with SO_REUSEPORT, so the kernel spreads connections over them, and
each serves the whole app: reads go to the database directly. A worker has no appender of its
own: what it appends (deliveries, admin commands) goes over the *ledger link*, a UNIX socket in
a directory only the server's user can open, to the one appender of the main process, and the
worker answers when that appender has committed, exactly as in one process. Group commit stays
one writer per database, and a worker moves what a process spends most of its time on (HTTP,
parsing, validation) to another core.

The link carries pickled frames (a 4-byte length, then `(kind, id, payload)`): commands and their
results are the ledger's own dataclasses, except the one sent most, a delivery, and its outcome:
they cross as tuples of their fields (`_DELIVERY`), which pickle several times faster than frozen
dataclasses. Pickle is safe here because only the server's user can reach the socket, and that
user can write the database file anyway.

A worker whose link is lost (the main process died) stops: it cannot acknowledge anything, and a
sender whose connection is refused retries. The main process restarts a worker that dies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import pickle
import shutil
import signal
import struct
import sys
import tempfile
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ledger.appender import Appender, Overdue
from ledger.commands import AppendEvents, Command, DeliveryOutcome, RecordDelivery
from ledger.errors import LedgerError, StorageUnavailable
from ledger.events import NewEvent
from ledger.fields import Fields
from server.metrics import Metrics

logger = logging.getLogger(__name__)

_HEAD = struct.Struct("!I")
APPEND, DELIVERY, COUNT, METRICS, READY = "append", "delivery", "count", "metrics", "ready"
COMMITTED = 0  # the id of a notice from the main process: its appender committed a batch
RESTART_DELAY_S = 1.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


_DELIVERY = Fields(RecordDelivery)  # a few strings: the event is encoded by the worker
_OUTCOME = Fields(DeliveryOutcome)
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)  # uvloop's: not a subclass

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
            asyncio.get_running_loop().call_soon(self.flush)
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
                _DELIVERY.made(payload), lambda result: self._answer(ident, result, _OUTCOME.of)
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
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
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


class RemoteAppender:
    """What a worker has instead of an appender (ledger.appender.Appender's interface)."""

    def __init__(self, link: LedgerLink, wait_s: float | None = None) -> None:
        self._link = link
        self._overdue = Overdue(wait_s) if wait_s else None  # as the main process's Appender
        self.folder = None
        self.committed = asyncio.Event()  # never set: a worker runs no projector
        # Called when the main process's appender commits a batch (its sizes are not known here).
        self.commit_listeners: list[Callable[[int, float], None]] = link.committed

    async def submit(self, command: Command) -> Any:
        if isinstance(command, RecordDelivery):
            return _OUTCOME.made(await self._call(DELIVERY, delivery_fields(command)))
        return await self._call(APPEND, command)

    def _call(self, kind: str, payload: Any) -> asyncio.Future[Any]:
        future = self._link.call(kind, payload)
        if self._overdue is not None:
            self._overdue.watch(future)
        return future

    async def append(self, events_: list[NewEvent], *, expected_version: int | None = None) -> Any:
        return await self.submit(AppendEvents(events=events_, expected_version=expected_version))

    async def run(self) -> None:
        await self._link.lost.wait()  # then `hookledger serve` stops this worker (server/cli.py)
        logger.error("evt=ledger_link_lost the main process is gone; this worker stops")

    async def close(self) -> None:
        self._link.close()


class RemoteMetrics(Metrics):
    """A worker's metrics: counts go to the main process's registry, and a scrape reads it, so
    every process answers `/metrics` with the same numbers.

    The counts of one loop iteration travel as one frame, at its end: a frame per answer cost
    the main process, the busier of the two, an unpickling and a dispatch per request. A scrape
    sends the counts made so far before its own call, so it sees every answer counted before it.
    """

    def __init__(self, link: LedgerLink) -> None:
        super().__init__()
        self._link = link
        self._counts: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def count_webhook(
        self, trigger_id: str, outcome: str, reason: str = "", times: int = 1
    ) -> None:
        if not self._counts:
            asyncio.get_running_loop().call_soon(self._send_counts)
        self._counts[(trigger_id, outcome, reason)] += times

    def _send_counts(self) -> None:
        counts, self._counts = self._counts, collections.Counter()
        if counts:  # (none left when a scrape took them first)
            self._link.send((COUNT, 0, [(*key, times) for key, times in counts.items()]))

    def observe_append(self, batch_size: int, seconds: float) -> None:
        """Nothing: the main process's appender observes its own batches."""

    async def page(self) -> bytes:
        self._send_counts()  # this iteration's counts first: the scrape sees them
        body: bytes = await self._link.call(METRICS, None)
        return body


# --- the main process's workers ------------------------------------------------------------


class WorkerFailed(Exception):
    """A worker exited before it listened (the port is taken, say): `serve` stops and says so."""


class Workers:
    """N worker processes of this `hookledger serve`: started, restarted when one dies, stopped."""

    def __init__(self, count: int, argv: Sequence[str], link_path: Path) -> None:
        self._count = count
        self._argv = list(argv)
        self._link_path = link_path
        self._processes: list[asyncio.subprocess.Process] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False
        self._listening: set[int] = set()  # pids of the workers that said READY
        self._started = False
        self._failed: int | None = None  # exit code of a worker that died while starting

    def ready(self, pid: int) -> None:
        self._listening.add(pid)

    async def start(self) -> None:
        """Start the workers; return once every one listens. WorkerFailed when one exits first
        or none is up within START_TIMEOUT_S: then nothing is left running."""
        for number in range(self._count):
            self._watchers.append(asyncio.create_task(self._keep(number)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while len(self._listening) < self._count:
            if self._failed is not None or loop.time() > deadline:
                await self.stop()
                code = self._failed
                raise WorkerFailed(
                    f"an ingest worker exited with code {code} before it listened"
                    if code is not None
                    else f"the ingest workers did not listen within {START_TIMEOUT_S:g} s"
                )
            await asyncio.sleep(0.05)
        self._started = True

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            *self._argv,
            "--ledger-link",
            str(self._link_path),
            stdin=asyncio.subprocess.DEVNULL,
        )

    async def _keep(self, number: int) -> None:
        while not self._stopping:
            process = await self._spawn()
            self._processes.append(process)
            logger.info("evt=worker_started worker=%d pid=%d", number, process.pid)
            code = await process.wait()
            self._processes.remove(process)
            self._listening.discard(process.pid)
            if self._stopping:
                return
            if not self._started:
                self._failed = code
                return
            logger.error("evt=worker_exited worker=%d pid=%d code=%s", number, process.pid, code)
            await asyncio.sleep(RESTART_DELAY_S)

    async def stop(self) -> None:
        self._stopping = True
        for process in self._processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
        for process in list(self._processes):
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


@contextlib.asynccontextmanager
async def running(
    count: int,
    argv: Sequence[str],
    appender: Appender,
    metrics: Metrics,
    page: Callable[[], Awaitable[bytes]],
) -> AsyncIterator[None]:
    """`count` workers of this `hookledger serve` (started with `argv`), linked to `appender`,
    from when every one listens (WorkerFailed otherwise) to their stop."""
    # The link's socket in a directory of our own (mode 0700), gone with the workers.
    link_dir = Path(tempfile.mkdtemp(prefix="hookledger-link-"))
    pool = Workers(count, argv, link_dir / "ledger.sock")
    link = await serve_link(
        link_dir / "ledger.sock", appender.enqueue_answered, metrics, page, pool.ready
    )
    appender.commit_listeners.append(link.committed)  # the workers' live feeds wake on it
    try:
        await pool.start()
        yield
    finally:
        await pool.stop()
        appender.commit_listeners.remove(link.committed)
        link.close()
        shutil.rmtree(link_dir, ignore_errors=True)
