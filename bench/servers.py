"""The servers under test, each in a process of its own: start, wait until it answers, sample its
memory, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ADMIN_TOKEN = "bench-admin-token"  # noqa: S105 - a throwaway server on loopback
SECRET_KEY = "bench-secret-key"  # noqa: S105
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    """One running server: its process, where it answers, and the peak RSS seen while sampling."""

    name: str
    process: asyncio.subprocess.Process
    url: str
    log: Path
    sampled_peak: int = 0
    samples: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        """Resident set size now, in bytes, of the server and its workers (0 once gone)."""
        return sum(_status_kb(pid, "VmRSS") for pid in tree(self.pid)) * 1024

    def peak_rss(self) -> int:
        """The kernel's high-water marks of the resident sets of the server and its workers
        (`serve --workers N`), over their lives, summed, in bytes."""
        return sum(_status_kb(pid, "VmHWM") for pid in tree(self.pid)) * 1024


def tree(pid: int) -> list[int]:
    """`pid` and its children (a server's ingest workers)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return [pid]
    children: list[int] = []
    for task in tasks:
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return [pid, *children]


def _status_kb(pid: int, field_name: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return _psutil_rss(pid)
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def _psutil_rss(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        return 0
    try:
        return int(psutil.Process(pid).memory_info().rss) // 1024
    except psutil.Error:
        return 0


def cpu_seconds(pid: int) -> float:
    """The user and system CPU a process has spent, in seconds (0 once it is gone)."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def postgres_pids() -> list[int]:
    """PostgreSQL's own processes, by their user: not every process whose command line names
    it, which hookledger's do through their database URL (the mistake of session 5's probe)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["username"]) if p.info["username"] == "postgres"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_ready(server: Server, path: str, within_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            if server.process.returncode is not None:
                raise RuntimeError(f"{server.name} exited at start; see {server.log}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(server.url + path) as response:
                    if response.status < 500:
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{server.name} did not answer within {within_s} s; see {server.log}")


async def _spawn(
    name: str, args: list[str], workdir: Path, env: dict[str, str], root: Path = ROOT
) -> Server:
    port = free_port()
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *args,
            "--port",
            str(port),
            cwd=workdir,
            env=os.environ | {"PYTHONPATH": str(root)} | env,
            stdout=out,
            stderr=out,
            stdin=asyncio.subprocess.DEVNULL,
        )
    return Server(name, process, f"http://127.0.0.1:{port}", log)


async def _stop(server: Server) -> None:
    if server.process.returncode is not None:
        return
    server.process.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(server.process.wait(), 15)
    except TimeoutError:
        server.process.kill()
        await server.process.wait()


@contextlib.asynccontextmanager
async def baseline(workdir: Path) -> AsyncIterator[Server]:
    server = await _spawn("baseline", [sys.executable, "-m", "bench.baseline"], workdir, {})
    try:
        await _wait_ready(server, "/")
        yield server
    finally:
        await _stop(server)


@contextlib.asynccontextmanager
async def floor(workdir: Path) -> AsyncIterator[Server]:
    """bench/floor.py on a fresh SQLite file: the baseline plus a durable, deduplicated write."""
    database = workdir / "floor.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    command = [sys.executable, "-m", "bench.floor", "--database", str(database)]
    server = await _spawn("floor", command, workdir, {})
    try:
        await _wait_ready(server, "/")
        yield server
    finally:
        await _stop(server)


@contextlib.asynccontextmanager
async def hookledger(
    name: str, database_url: str, workdir: Path, workers: int = 0, root: Path = ROOT
) -> AsyncIterator[Server]:
    """`hookledger serve` as a user starts it: the console script, its dispatcher running (the
    bench's trigger has no destination: it finds nothing due), with `workers` ingest workers
    (`serve --workers N`); the code of the checkout at `root` (`bench.probe --against`: another
    commit's, for an A/B). `HOOKLEDGER_BENCH_NO_DISPATCH=1` adds `--no-dispatch`."""
    command = [str(Path(sys.executable).parent / "hookledger"), "--database-url", database_url]
    env = {
        "HOOKLEDGER_ADMIN_TOKEN": ADMIN_TOKEN,
        "HOOKLEDGER_SECRET_KEY": SECRET_KEY,
        "HOOKLEDGER_LOG_FORMAT": "json",
    }
    dispatch = ["--no-dispatch"] if os.environ.get("HOOKLEDGER_BENCH_NO_DISPATCH") == "1" else []
    serve = [*command, "serve", *dispatch, "--workers", str(workers)]
    server = await _spawn(name, serve, workdir, env, root)
    try:
        await _wait_ready(server, "/healthz")
        yield server
    finally:
        await _stop(server)


async def sample_rss(server: Server, every_s: float = 0.1) -> None:
    """Run until cancelled, keeping the largest RSS seen in `server.sampled_peak`."""
    while True:
        rss = server.rss()
        server.samples.append(rss)
        server.sampled_peak = max(server.sampled_peak, rss)
        await asyncio.sleep(every_s)
