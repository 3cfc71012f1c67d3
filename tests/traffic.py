"""Traffic for readers' tests: deliveries over real HTTP, and dispatch outcomes appended to the log
as the dispatcher would (execution.* events on the execution's stream)."""

from __future__ import annotations

import asyncio
import random
import sys
from typing import Any

from aiohttp.test_utils import TestClient
from conftest import create_trigger

from ledger.appender import Appender
from ledger.events import (
    EventData,
    ExecutionDeadLettered,
    ExecutionFailed,
    ExecutionReplayRequested,
    ExecutionStarted,
    ExecutionSucceeded,
    NewEvent,
    execution_stream,
)
from ledger.store import read_last_seq
from server.state import SERVICES

JSON_HEADERS = {"Content-Type": "application/json"}
DESTINATION = {"url": "http://127.0.0.1:9/hook"}


async def deliver(
    client: TestClient,  # type: ignore[type-arg]
    trigger: str,
    body: str = "{}",
    key: str | None = None,
) -> dict[str, Any]:
    headers = JSON_HEADERS | ({"Idempotency-Key": key} if key else {})
    response = await client.post(f"/webhooks/{trigger}", data=body, headers=headers)
    assert response.status in (200, 202), await response.text()
    return await response.json()  # type: ignore[no-any-return]


async def append_outcome(
    appender: Appender, trigger_id: str, execution_id: str, payloads: list[EventData]
) -> None:
    events = [
        NewEvent.of(execution_stream(execution_id), trigger_id, payload) for payload in payloads
    ]
    await appender.append(events)


def attempt_history(rng: random.Random) -> list[EventData]:
    """One execution's dispatch story: some failures, then success, dead letter, maybe a replay."""
    history: list[EventData] = []
    attempt = 0
    for _ in range(rng.randint(0, 2)):
        attempt += 1
        category = rng.choice(["transient", "transient", "permanent"])
        history += [
            ExecutionStarted(attempt=attempt, lease_until="2030-01-01T00:00:00.000000Z"),
            ExecutionFailed(
                attempt=attempt,
                error_category=category,
                error="HTTP 503" if category == "transient" else "HTTP 400",
                status_code=503 if category == "transient" else 400,
                retry_at=None if category == "permanent" else "2030-01-01T00:00:00.000000Z",
                duration_ms=rng.uniform(1, 50),
            ),
        ]
        if category == "permanent":
            history.append(ExecutionDeadLettered(reason="permanent", error_category="permanent"))
            if rng.random() < 0.5:
                history.append(ExecutionReplayRequested(requested_by="test"))
                attempt = 0
            else:
                return history
    attempt += 1
    history += [
        ExecutionStarted(attempt=attempt, lease_until="2030-01-01T00:00:00.000000Z"),
        ExecutionSucceeded(attempt=attempt, status_code=200, duration_ms=rng.lognormvariate(3, 1)),
    ]
    return history


async def mixed_traffic(client: TestClient, *, seed: int = 7, deliveries: int = 40) -> None:  # type: ignore[type-arg]
    """Two triggers (one with a filter), duplicates with same and different bodies, outcomes."""
    rng = random.Random(seed)
    await create_trigger(client, id="alpha", destination=DESTINATION)
    await create_trigger(client, id="beta", destination=DESTINATION, filter={"kind": "keep*"})
    appender = client.app[SERVICES].appender
    for _ in range(deliveries):
        trigger = rng.choice(["alpha", "beta"])
        kind = rng.choice(["keep", "keep-too", "drop"])
        key = f"k{rng.randint(0, deliveries // 2)}"
        body = f'{{"kind": "{kind}", "n": {rng.randint(0, 2)}}}'
        answer = await deliver(client, trigger, body, key=key)
        if not answer["duplicate"] and (trigger == "alpha" or kind != "drop"):
            await append_outcome(appender, trigger, answer["execution_id"], attempt_history(rng))


async def settle(client: TestClient) -> int:  # type: ignore[type-arg]
    """Wait until every projection has folded the whole log; the head seq."""
    runner = client.app[SERVICES].runner
    async with runner.engine.connect() as conn:
        head = await read_last_seq(conn)
    await runner.wait_for(head)
    return head


class CliResult:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


async def run_cli(database_url: str, *args: str, within_s: float = 120) -> CliResult:
    """`hookledger …` in a process of its own, as a user runs it (the event loop keeps serving)."""
    code = "from server.cli import main; main()"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--database-url",
        database_url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(within_s):
        out, err = await process.communicate()
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())
