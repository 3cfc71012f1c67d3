"""A large log, fast: deliveries appended through the ledger's own API in big batches, not via HTTP.

Keys are dup-1 .. dup-N, so the duplicate scenario of the load generator (`KEYS=N`) draws from
the whole log; one delivery in ten repeats an earlier key (a `webhook.duplicate`), so rebuilds
meet rows created in earlier batches.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from bench.load import PAYLOAD, TRIGGER_ID
from ledger.appender import append_commands
from ledger.commands import RecordDelivery
from ledger.events import WebhookReceived, uuid7
from ledger.store import read_last_seq, write_transaction

BATCH = 5000
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
    return RecordDelivery(trigger_id=TRIGGER_ID, idempotency_key=key, received=received, meta=meta)


def _batch(start: int, size: int, rng: random.Random, body: str) -> tuple[list[RecordDelivery], int]:
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
    """Append deliveries until the log holds `events` events; returns the number of distinct keys."""
    async with engine.connect() as conn:
        done = await read_last_seq(conn)
    rng, body, number = random.Random(6), PAYLOAD.read_text(), 1
    started = time.monotonic()
    while done < events:
        commands, number = _batch(number, min(BATCH, events - done), rng, body)
        async with write_transaction(engine) as conn:
            await append_commands(conn, commands)
        done += len(commands)
        if progress:
            progress(done, time.monotonic() - started)
    return number - 1
