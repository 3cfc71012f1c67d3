"""Ingest workers: more processes answering HTTP on the same port, still one writer.

`hookledger serve --workers N` starts N worker processes beside itself (the main process). The
workers listen on the port with SO_REUSEPORT, so the kernel spreads connections over them, and each
serves the whole app: reads go to the database directly. The main process answers no HTTP then: it
is the ledger's (the appender, the projector, the dispatcher). A worker has no appender of its own:
what it appends (deliveries, admin commands) goes over the *ledger link* (server/link.py) to the one
appender of the main process (server/remote.py is a worker's side of it), and the worker answers
when that appender has committed, exactly as in one process. Group commit stays one writer per
database, and a worker moves what a process spends most of its time on (HTTP, parsing, validation)
to another core.

A worker whose link is lost (the main process died) stops: it cannot acknowledge anything, and a
sender whose connection is refused retries. The main process restarts a worker that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from ledger.appender import Appender
from server.link import serve_link
from server.metrics import Metrics

logger = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


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
