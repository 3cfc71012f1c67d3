"""An ingest worker's share alone: HTTP requests handed to the fast lane as its connections would
read them (no sockets), the ledger link answered at once by this process. The CPU (or, under
valgrind, the instructions) a request of what a worker does in user space; with
`bench.writer --link` (the main process's share) it splits a delivery's cost by process.

    python -m bench.worker                       # new deliveries, 32 connections
    python -m bench.worker --duplicates
    valgrind --tool=cachegrind --cache-sim=no python -m bench.worker --rounds N   # two values of N

What is not a worker's own: the link's answers are made here (an unpickling and a pickling a
delivery, ~2 % of the count), and the kernel's work (the sockets' reads and writes, about a third
of a worker's CPU under load) is not in it. The trigger is read once (its cache does not expire
during the run), so no thread's timing moves the count; the collector is tuned as `hookledger
serve` tunes it.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.databases import sqlite_url
from bench.load import PAYLOAD, TRIGGER_ID
from bench.writer import cpu_s, key
from ledger.commands import DeliveryOutcome
from ledger.events import TriggerRegistered
from ledger.fields import Fields
from ledger.migrate import upgrade
from server import catalog
from server import link as ledger_link
from server.app import build_services
from server.cli import tune_gc
from server.config import Settings
from server.fastlane import FastLane
from server.logs import configure
from server.ratelimit import RateLimiter
from server.triggers import event_for

CONNECTIONS = 32
EVENT_ID, EXECUTION_ID, ORIGINAL_ID = (f"01900000-0000-7000-8000-00000000000{n}" for n in (1, 2, 3))


class _LinkTransport:
    """The worker's end of the link writes here; each delivery is answered at once."""

    def __init__(self, link: ledger_link.LedgerLink, duplicates: bool) -> None:
        self._link = link
        original = ORIGINAL_ID if duplicates else None
        outcome = DeliveryOutcome(EVENT_ID, EXECUTION_ID, duplicates, original, seq=7)
        self._outcome = Fields(DeliveryOutcome).of(outcome)  # as the main process answers

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        answers = [
            ledger_link.frame((ident, True, self._outcome))
            for kind, ident, _ in ledger_link.unframe(bytearray(data))
            if kind == ledger_link.DELIVERY
        ]
        if answers:
            asyncio.get_running_loop().call_soon(self._link.data_received, b"".join(answers))


class _Answers:
    """The HTTP connections' transport: counts the answers written."""

    def __init__(self) -> None:
        self.count, self.wanted = 0, 0
        self.reached = asyncio.Event()
        self.first = b""

    def transport(self) -> Any:
        answers = self

        class Transport:
            def is_closing(self) -> bool:
                return False

            def get_extra_info(self, _name: str, default: Any = None) -> Any:
                return default

            def write(self, data: bytes) -> None:
                answers.first = answers.first or bytes(data)
                answers.count += 1
                if answers.count >= answers.wanted:
                    answers.reached.set()

        return Transport()


def _request(n: int, body: bytes, duplicates: bool) -> bytes:
    head = (
        f"POST /webhooks/{TRIGGER_ID} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        f"Content-Type: application/json\r\nIdempotency-Key: {key(n, duplicates)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def measure(rounds: int, duplicates: bool, payload: Path) -> tuple[float, bytes]:
    """CPU µs a request over `rounds` rounds of a request on each connection (the first round
    not counted), and the first answer's bytes."""
    configure("json")  # the idempotent_replay lines, as `hookledger serve` writes them (stderr)
    catalog.CACHE_TTL_S = 1e9
    body = payload.read_bytes()
    with tempfile.TemporaryDirectory(prefix="hookledger-worker-") as tmp:
        url = sqlite_url(Path(tmp) / "worker.db")
        settings = Settings(database_url=url, admin_token="t", secret_key="k")  # noqa: S106 - a throwaway database's
        ledger = build_services(settings)  # the main process's, to register the trigger
        await upgrade(ledger.engine)
        writing = asyncio.create_task(ledger.appender.run())
        await ledger.appender.append(
            [event_for(TRIGGER_ID, TriggerRegistered(id=TRIGGER_ID, source="generic"))]
        )
        await ledger.runner.catch_up()
        writing.cancel()
        link = ledger_link.LedgerLink()
        link.connection_made(_LinkTransport(link, duplicates))  # type: ignore[arg-type]
        services = build_services(settings, link=link)
        lane = FastLane(services, RateLimiter(), lambda: asyncio.Protocol(), 10.0)
        answers = _Answers()
        connections = [lane() for _ in range(CONNECTIONS)]
        for connection in connections:
            connection.connection_made(answers.transport())
        requests = [_request(n, body, duplicates) for n in range(rounds * CONNECTIONS)]
        tune_gc()  # as `hookledger serve` once it is up
        started = 0.0
        for round_ in range(rounds):
            if round_ == 1:
                started = cpu_s()
            answers.wanted += CONNECTIONS
            answers.reached.clear()
            for n, connection in enumerate(connections):
                connection.data_received(requests[round_ * CONNECTIONS + n])
            await answers.reached.wait()
        spent = cpu_s() - started
        await services.engine.dispose()
        await ledger.engine.dispose()
    return spent / ((rounds - 1) * CONNECTIONS) * 1e6, answers.first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="a request on each connection")
    parser.add_argument("--duplicates", action="store_true", help="repeat keys seen before")
    parser.add_argument("--payload", default=str(PAYLOAD))
    args = parser.parse_args()
    wall = time.perf_counter()
    cpu_us, first = uvloop.run(measure(args.rounds, args.duplicates, Path(args.payload)))
    status = first.split(b"\r\n", 1)[0].decode()
    scenario = "duplicates" if args.duplicates else "new deliveries"
    print(
        f"worker: {scenario}, {args.rounds} rounds of {CONNECTIONS} requests ({status}): "
        f"CPU {cpu_us:.1f} us a request ({time.perf_counter() - wall:.1f} s in all)",
        flush=True,
    )


if __name__ == "__main__":
    main()
