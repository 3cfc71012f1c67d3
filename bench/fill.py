"""A large log, fast: deliveries appended through the ledger's own API in big batches, not via HTTP.

Keys are dup-1 .. dup-N, so the duplicate scenario of the load generator (`KEYS=N`) draws from
the whole log; one delivery in ten repeats an earlier key (a `webhook.duplicate`), so rebuilds
meet rows created in earlier batches.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.databases import sqlite_url
from bench.load import PAYLOAD, TRIGGER_ID
from ledger.append import append_commands
from ledger.commands import RecordDelivery
from ledger.events import WebhookReceived, uuid7
from ledger.migrate import upgrade
from ledger.store import create_engine, write_transaction

BATCH = 5000
SMOKE_EVENTS = 5_000  # the large log of --smoke: proves the suites work, measures nothing
DUPLICATE_EVERY = 10
_HEADERS = {"content-type": "application/json", "host": "127.0.0.1", "user-agent": "bench"}


def _delivery(key: str, body: str) -> RecordDelivery:
    received = WebhookReceived(
        execution_id=uuid7(),
        headers=_HEADERS | {"idempotency-key": key},
        body=body,
        content_type="application/json",
        body_sha256="0" * 64,
        initial_status="recorded",
    )
    meta = {"request_id": None, "source": "generic"}
    return RecordDelivery.of(
        trigger_id=TRIGGER_ID, idempotency_key=key, received=received, meta=meta
    )


def _batch(
    start: int, size: int, rng: random.Random, body: str
) -> tuple[list[RecordDelivery], int]:
    """`size` deliveries from key number `start` on; returns them and the next new key number."""
    commands, number = [], start
    for _ in range(size):
        if number > 1 and rng.randrange(DUPLICATE_EVERY) == 0:
            commands.append(_delivery(f"dup-{rng.randrange(1, number)}", body))
        else:
            commands.append(_delivery(f"dup-{number}", body))
            number += 1
    return commands, number


async def fill_log(
    engine: AsyncEngine, events: int, progress: Callable[[int, float], None] | None = None
) -> int:
    """Append `events` deliveries to an empty log; returns the number of distinct keys."""
    rng, body, number, done = random.Random(6), PAYLOAD.read_text(), 1, 0
    started = time.monotonic()
    while done < events:
        commands, number = _batch(number, min(BATCH, events - done), rng, body)
        async with write_transaction(engine) as conn:
            await append_commands(conn, commands)
        done += len(commands)
        if progress:
            progress(done, time.monotonic() - started)
    return number - 1


def _report(events: int) -> Callable[[int, float], None]:
    def progress(done: int, seconds: float) -> None:
        if done % 100_000 < BATCH or done == events:
            print(f"  filled {done:,}/{events:,} events ({done / seconds:,.0f}/s)", flush=True)

    return progress


async def sqlite_log(workdir: Path, events: int) -> tuple[str, int]:
    """A SQLite log of `events` deliveries in `workdir`, made once per bench run and then reused."""
    path, sidecar = workdir / f"log-{events}.db", workdir / f"log-{events}.json"
    if sidecar.exists():
        return f"sqlite:///{path}", int(orjson.loads(sidecar.read_bytes())["keys"])
    url = sqlite_url(path)
    engine = create_engine(url)
    try:
        await upgrade(engine)
        keys = await fill_log(engine, events, _report(events))
    finally:
        await engine.dispose()
    sidecar.write_bytes(orjson.dumps({"keys": keys}))
    return url, keys
