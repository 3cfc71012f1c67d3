"""One load point against one server, with the CPU each of its processes spent a request.

For A/B comparisons of a change: req/s moves by 10–20 % from one minute to the next on a shared
machine, the CPU a request much less, and alternating runs of the two codes (`--against` another
checkout, `--pairs N`) expose both to the same moments.

    python -m bench.probe sqlite --workers 1               # hookledger serve, a fresh SQLite file
    python -m bench.probe postgres --pg-url postgresql://postgres@127.0.0.1:5432/test
    python -m bench.probe baseline                          # or floor
    git worktree add /tmp/before HEAD~1
    python -m bench.probe sqlite --against /tmp/before --pairs 3

"PostgreSQL's CPU" is that of its own processes (`bench.servers.postgres_pids`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench import servers
from bench.databases import postgres_database, sqlite_url
from bench.load import PAYLOAD, Load, ensure_wrk, run_load
from bench.throughput import Admin, seed

KINDS = ("baseline", "floor", "sqlite", "postgres")
DUP_KEYS = 256


@dataclass(frozen=True, slots=True)
class Probed:
    code: str  # which checkout served it
    rps: float
    p99_ms: float
    cpu_ms: list[float]  # a request, each process of the server (the main one first)
    database_cpu_ms: float | None  # PostgreSQL's processes, a request
    load_cpu_ms: float  # the load generator's, a request
    batches: Batches | None = None  # hookledger's append transactions during the load

    def line(self) -> str:
        cpu = " + ".join(f"{ms:.3f}" for ms in self.cpu_ms)
        text = f"{self.code}: {self.rps:8,.0f} req/s  p99 {self.p99_ms:6.2f} ms  CPU {cpu} ms"
        if self.database_cpu_ms is not None:
            text += f", PostgreSQL's {self.database_cpu_ms:.3f} ms"
        text += f" (wrk {self.load_cpu_ms:.3f}) a request"
        if self.batches is not None:
            text += f"; {self.batches.line()}"
        return text


@dataclass(frozen=True, slots=True)
class Batches:
    """The group commit's transactions, from the appender's two histograms in `/metrics`."""

    count: float
    commands: float
    seconds: float
    quick: float  # those that took at most SLOW_S

    def __sub__(self, other: Batches) -> Batches:
        return Batches(
            self.count - other.count,
            self.commands - other.commands,
            self.seconds - other.seconds,
            self.quick - other.quick,
        )

    def line(self) -> str:
        count = max(self.count, 1)
        return (
            f"{self.count:,.0f} appends, {self.commands / count:.1f} commands "
            f"and {self.seconds / count * 1e3:.2f} ms each, {self.count - self.quick:,.0f} "
            f"over {SLOW_S * 1e3:g} ms"
        )


SLOW_S = 0.01  # a bucket of hookledger_append_batch_seconds
_SAMPLE = re.compile(
    r"^(hookledger_append_batch_(?:size|seconds)_(?:count|sum)"
    rf'|hookledger_append_batch_seconds_bucket{{le="{SLOW_S}"}}) (\S+)$',
    re.M,
)


def _children_cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


async def _batches(session: aiohttp.ClientSession, server: servers.Server) -> Batches:
    async with session.get(f"{server.url}/metrics") as response:
        samples = {name: float(value) for name, value in _SAMPLE.findall(await response.text())}
    return Batches(
        samples.get("hookledger_append_batch_size_count", 0.0),
        samples.get("hookledger_append_batch_size_sum", 0.0),
        samples.get("hookledger_append_batch_seconds_sum", 0.0),
        samples.get(f'hookledger_append_batch_seconds_bucket{{le="{SLOW_S}"}}', 0.0),
    )


@contextlib.asynccontextmanager
async def _server(
    args: argparse.Namespace, root: Path, workdir: Path
) -> AsyncIterator[servers.Server]:
    if args.kind == "baseline":
        async with servers.baseline(workdir) as server:
            yield server
    elif args.kind == "floor":
        async with servers.floor(workdir) as server:
            yield server
    elif args.kind == "sqlite":
        url = sqlite_url(workdir / "probe.db")
        async with servers.hookledger("sqlite", url, workdir, args.workers, root) as server:
            yield server
    else:
        async with (
            postgres_database(args.pg_url, "probe") as url,
            servers.hookledger("postgres", url, workdir, args.workers, root) as server,
        ):
            yield server


@contextlib.contextmanager
def _profiled(into: str | None, pids: list[int], seconds: int) -> Iterator[None]:
    """py-spy sampling each server process during the load (its own CPU is on other pids)."""
    if into is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    Path(into).mkdir(parents=True, exist_ok=True)
    spies = [
        subprocess.Popen(
            [
                spy,
                "record",
                "-r",
                "200",
                "-f",
                "raw",
                "-d",
                str(seconds),
                "--nonblocking",
                "-p",
                str(pid),
                "-o",
                str(Path(into) / f"process-{n}.raw"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n, pid in enumerate(pids)
    ]
    try:
        yield
    finally:
        for spy_process in spies:
            spy_process.wait()
        for n in range(len(pids)):
            print(profile_summary(Path(into) / f"process-{n}.raw", f"process {n}"), flush=True)


def profile_summary(raw: Path, title: str, top: int = 25) -> str:
    """The functions holding the most samples of a py-spy raw file: own, and with callees."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            under[frame] += samples
    total = max(total, 1)
    lines = [f"{title}: {total} samples ({raw})", "  own %  function"]
    lines += [f"  {n / total * 100:5.1f}  {name}" for name, n in own.most_common(top)]
    lines += ["  with callees %  function"]
    lines += [f"  {n / total * 100:5.1f}  {name}" for name, n in under.most_common(top * 2)]
    return "\n".join(lines)


async def probe(args: argparse.Namespace, wrk: str | None, root: Path, code: str) -> Probed:
    """Start the server, give hookledger its trigger and the duplicates' keys, warm up, then one
    measured point."""
    with tempfile.TemporaryDirectory(prefix="hookledger-probe-") as tmp:
        workdir = Path(tmp)
        async with _server(args, root, workdir) as server:
            hookledger = args.kind in ("sqlite", "postgres")
            if hookledger:
                async with aiohttp.ClientSession() as session:
                    admin = Admin(session, server)
                    await admin.create_trigger()
                    await seed(admin, DUP_KEYS)
            stamp = time.time_ns()
            payload = Path(args.payload)
            warmup = Load(args.scenario, args.connections, 1, f"warm{stamp}", DUP_KEYS, payload)
            await run_load(wrk, server.url, warmup, workdir / "warmup.json")
            pids = servers.tree(server.pid)
            database = servers.postgres_pids() if args.kind == "postgres" else []
            async with aiohttp.ClientSession() as session:
                first = await _batches(session, server) if hookledger else None
                before = {pid: servers.cpu_seconds(pid) for pid in pids + database}
                children = _children_cpu_s()
                load = Load(
                    args.scenario, args.connections, args.seconds, f"p{stamp}", DUP_KEYS, payload
                )
                with _profiled(args.profile, pids, args.seconds):
                    result = await run_load(wrk, server.url, load, workdir / "probe.json")
                spent = {pid: servers.cpu_seconds(pid) - before[pid] for pid in before}
                load_cpu_s = _children_cpu_s() - children  # wrk's, once it has been waited for
                batches = await _batches(session, server) - first if first else None
    requests = max(result.requests, 1)
    return Probed(
        code,
        result.rps,
        result.p99_ms,
        [spent[pid] / requests * 1e3 for pid in pids],
        sum(spent[pid] for pid in database) / requests * 1e3 if database else None,
        load_cpu_s / requests * 1e3,
        batches,
    )


async def _main(args: argparse.Namespace) -> None:
    wrk = ensure_wrk()
    codes = [("this", servers.ROOT)]
    if args.against:
        codes.append((f"against {args.against}", Path(args.against).resolve()))
    print(
        f"probe: {args.kind}, {args.scenario}, c={args.connections}, {args.seconds} s"
        + (f", --workers {args.workers}" if args.kind in ("sqlite", "postgres") else ""),
        flush=True,
    )
    for _pair in range(args.pairs):
        for code, root in reversed(codes):  # the other code first, then this one
            print((await probe(args, wrk, root, code)).line(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--workers", type=int, default=0, help="hookledger serve --workers N")
    parser.add_argument("--pg-url", default=os.environ.get("PG_URL"), help="for postgres")
    parser.add_argument("--scenario", choices=("new", "dup", "mix"), default="new")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--against", help="another checkout (a git worktree) to alternate with")
    parser.add_argument("--pairs", type=int, default=1, help="runs of each code, alternating")
    parser.add_argument("--payload", default=str(PAYLOAD), help="the body of every request")
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy each server process during the load (raw files)"
    )
    args = parser.parse_args()
    if args.kind == "postgres" and not args.pg_url:
        parser.error("postgres needs --pg-url (or PG_URL)")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
