"""The writer alone: the appender with the projections folded in, fed batches of deliveries as the
receiver makes them, without HTTP. CPU (and wall time) a delivery by batch size; on PostgreSQL,
PostgreSQL's own CPU a delivery too (its processes, counted by their user).

    python -m bench.writer                                  # a fresh SQLite file
    python -m bench.writer --pg-url postgresql://postgres@127.0.0.1:5432/test
    python -m bench.writer --batches 32 --deliveries 20000 --duplicates
    python -m bench.writer --batches 32 --link              # the ledger process with a worker

`--link` measures what the main process of `hookledger serve --workers N` does: the deliveries
come over a real ledger link (`server.link`), as frames a feeder process made beforehand and
sends a batch at a time, each once the last was answered; the answers go back as frames. Only
this process's CPU is counted (and, under valgrind, only its instructions: the feeder is
another program).

For a change smaller than the machine's noise, count instructions instead (user space; SQLite's
and the kernel's waits are not in it): run it twice under `valgrind --tool=cachegrind
--cache-sim=no` with different `--deliveries` and one batch size; the difference of the two
"I refs" over the difference of deliveries repeats to about ±1 % (bench/README.md, session 6).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import resource
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from bench.databases import postgres_database, sqlite_url
from bench.load import PAYLOAD, TRIGGER_ID
from bench.servers import cpu_seconds, postgres_pids
from ledger.appender import Appender
from ledger.commands import RecordDelivery
from ledger.events import WebhookReceived, uuid7
from ledger.migrate import upgrade
from ledger.store import create_engine
from projections.registry import PROJECTIONS
from projections.runner import ProjectionRunner
from server import link as ledger_link
from server.metrics import Metrics

# What wrk sends with bench/lua/deliveries.lua, as the receiver keeps it.
HEADERS = {
    "host": "127.0.0.1:8080",
    "content-type": "application/json",
    "content-length": str(PAYLOAD.stat().st_size),
    "idempotency-key": "k",
}
DUPLICATE_KEYS = 256


def delivery(key: str, body: str) -> RecordDelivery:
    """A delivery as `server.receiver` makes one."""
    received = WebhookReceived(
        execution_id=uuid7(),
        headers=HEADERS,
        body=body,
        content_type="application/json",
        body_sha256=hashlib.sha256(body.encode()).hexdigest(),
        initial_status="pending",
    )
    meta = {"request_id": "0123456789abcdef", "source": "generic"}
    return RecordDelivery.of(
        trigger_id=TRIGGER_ID, idempotency_key=key, received=received, meta=meta
    )


@dataclass(frozen=True, slots=True)
class Measured:
    batch: int
    deliveries: int
    cpu_us: float  # this process's CPU a delivery
    wall_us: float
    database_cpu_us: float | None  # PostgreSQL's processes' CPU a delivery


def cpu_s() -> float:
    """This process's CPU (user and system), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _postgres_cpu_s() -> float:
    return sum(cpu_seconds(pid) for pid in postgres_pids())


@contextlib.asynccontextmanager
async def folding_appender(url: str, payload: Path = PAYLOAD) -> AsyncIterator[Appender]:
    """The appender of a fresh database at `url`, writing, with the projections folded into each
    append (as `hookledger serve` runs it), after 256 deliveries (`dup-0` …) that warm it and
    give duplicates their keys."""
    engine = create_engine(url)
    await upgrade(engine)
    appender = Appender(engine)
    runner = ProjectionRunner(engine, list(PROJECTIONS.values()))
    appender.folder = runner
    try:
        async with appender.running():
            body = payload.read_text()
            for n in range(DUPLICATE_KEYS):
                await appender.submit(delivery(key(n, duplicates=True), body))
            await runner.catch_up()  # checkpoints at the head: from here on, folds are inline
            yield appender
    finally:
        await engine.dispose()


def key(n: int, duplicates: bool) -> str:
    """The `n`th delivery's idempotency key: new, or one of those `folding_appender` received."""
    return f"dup-{n % DUPLICATE_KEYS}" if duplicates else f"w-{n}"


def _keys(sent: int, batch: int, duplicates: bool) -> list[str]:
    return [key(n, duplicates) for n in range(sent, sent + batch)]


async def measure(
    url: str,
    batches: list[int],
    deliveries: int,
    *,
    duplicates: bool = False,
    payload: Path = PAYLOAD,
    link: bool = False,
) -> list[Measured]:
    """For each batch size, `deliveries` deliveries of `payload` appended `batch` at a time (at
    least 20 batches); over the ledger link from a feeder process with `link`."""
    body = payload.read_text()
    on_postgres = url.startswith("postgresql")
    results = []
    async with folding_appender(url, payload) as appender:
        sent = 1
        for batch in batches:
            rounds = max(20, deliveries // batch)
            cpu, wall = cpu_s(), time.perf_counter()
            database = _postgres_cpu_s() if on_postgres else 0.0
            if link:
                count, cpu, wall, database = await _over_link(
                    appender, batch, rounds, sent, duplicates, payload, on_postgres
                )
            else:
                for round_ in range(rounds):
                    keys = _keys(sent + round_ * batch, batch, duplicates)
                    await asyncio.gather(*(appender.enqueue(delivery(k, body)) for k in keys))
                count = rounds * batch
            sent += rounds * batch
            results.append(
                Measured(
                    batch,
                    count,
                    (cpu_s() - cpu) / count * 1e6,
                    (time.perf_counter() - wall) / count * 1e6,
                    (_postgres_cpu_s() - database) / count * 1e6 if on_postgres else None,
                )
            )
    return results


class _Committed:
    """An appender commit listener: where the count and the clocks stood at the first commit,
    and when every delivery of the run is committed."""

    def __init__(self, total: int, on_postgres: bool) -> None:
        self._total, self._on_postgres, self._seen = total, on_postgres, 0
        self.first: tuple[int, float, float, float] | None = None
        self.done = asyncio.Event()

    def __call__(self, size: int, _seconds: float) -> None:
        self._seen += size
        if self.first is None:  # from here on: the first batch (and the start) not counted
            database = _postgres_cpu_s() if self._on_postgres else 0.0
            self.first = (self._seen, cpu_s(), time.perf_counter(), database)
        if self._seen >= self._total:
            self.done.set()


async def _over_link(
    appender: Appender,
    batch: int,
    rounds: int,
    sent: int,
    duplicates: bool,
    payload: Path,
    on_postgres: bool,
) -> tuple[int, float, float, float]:
    """Feed `rounds` batches over a ledger link; the deliveries counted, and the clocks (CPU,
    wall, PostgreSQL's CPU) when counting began."""
    with tempfile.TemporaryDirectory(prefix="hookledger-link-") as tmp:
        path = Path(tmp) / "link.sock"
        server = await ledger_link.serve_link(path, appender.enqueue_answered, Metrics(), _no_page)
        committed = _Committed(rounds * batch, on_postgres)
        appender.commit_listeners += [server.committed, committed]
        feeder = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.writer", "--feed", str(path), "--batches", str(batch),
            "--deliveries", str(rounds * batch), "--first", str(sent), "--payload", str(payload),
            *(["--duplicates"] if duplicates else []),
        )  # fmt: skip
        try:
            await committed.done.wait()
            if await feeder.wait() != 0:
                raise RuntimeError(f"the feeder failed ({feeder.returncode})")
        finally:
            appender.commit_listeners.remove(committed)
            appender.commit_listeners.remove(server.committed)
            server.close()
            if feeder.returncode is None:
                feeder.kill()
    assert committed.first is not None
    counted_from, cpu, wall, database = committed.first
    return rounds * batch - counted_from, cpu, wall, database


async def _no_page() -> bytes:
    return b""


def feed(path: str, batch: int, deliveries: int, first: int, duplicates: bool, body: str) -> None:
    """The feeder (`--feed`): frames made first, then a batch at a time over the link, each sent
    when every answer of the one before has come back."""
    batches = []
    for start in range(first, first + deliveries, batch):
        keys = _keys(start, batch, duplicates)
        batches.append(
            b"".join(
                ledger_link.frame(
                    (ledger_link.DELIVERY, n, ledger_link.delivery_fields(delivery(k, body)))
                )
                for n, k in enumerate(keys, start=1)
            )
        )
    with socket.socket(socket.AF_UNIX) as link:
        link.connect(path)
        received = bytearray()
        for frames in batches:
            link.sendall(frames)
            answered = 0
            while answered < batch:
                received += link.recv(1 << 16)
                answered += sum(
                    ident != ledger_link.COMMITTED for ident, _, _ in ledger_link.unframe(received)
                )


@contextlib.asynccontextmanager
async def _database(pg_url: str | None) -> AsyncIterator[str]:
    if pg_url:
        async with postgres_database(pg_url, "writer") as url:
            yield url
        return
    with tempfile.TemporaryDirectory(prefix="hookledger-writer-") as tmp:
        yield sqlite_url(Path(tmp) / "writer.db")


def line(result: Measured) -> str:
    text = (
        f"batch {result.batch:4d}: {result.deliveries:7,d} deliveries, "
        f"CPU {result.cpu_us:6.1f} us a delivery, wall {result.wall_us:6.1f} us"
    )
    if result.database_cpu_us is not None:
        text += f", PostgreSQL's CPU {result.database_cpu_us:6.1f} us"
    return text


async def _main(args: argparse.Namespace, out: Callable[[str], None]) -> None:
    batches = [int(b) for b in args.batches.split(",")]
    async with _database(args.pg_url) as url:
        scenario = "duplicates" if args.duplicates else "new deliveries"
        if args.link:
            scenario += ", over the ledger link (this process: the main one's share)"
        payload = Path(args.payload)
        out(f"writer: {scenario} of {payload.name}, {url.split(':', 1)[0]}")
        measured = await measure(
            url,
            batches,
            args.deliveries,
            duplicates=args.duplicates,
            payload=payload,
            link=args.link,
        )
        for result in measured:
            out(line(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", help="a PostgreSQL server (a fresh database, dropped after)")
    parser.add_argument("--batches", default="1,8,32,64,128", help="batch sizes, comma-separated")
    parser.add_argument("--deliveries", type=int, default=4000, help="deliveries a batch size")
    parser.add_argument("--duplicates", action="store_true", help="repeat keys seen before")
    parser.add_argument(
        "--payload",
        default=str(PAYLOAD),
        help="the body (bench/payload-push.json: a 9.5 KB GitHub push, past PostgreSQL's ~2 KB"
        " compression threshold)",
    )
    parser.add_argument(
        "--link", action="store_true", help="over the ledger link, from a feeder process"
    )
    parser.add_argument("--feed", help=argparse.SUPPRESS)  # the feeder: the link's path
    parser.add_argument("--first", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.feed:
        body = Path(args.payload).read_text()
        feed(args.feed, int(args.batches), args.deliveries, args.first, args.duplicates, body)
        return
    asyncio.run(_main(args, lambda text: print(text, flush=True)))


if __name__ == "__main__":
    main()
