"""The dispatcher: finds due executions in `trigger_executions`, claims each attempt by appending
`execution.started` with the stream version it read, delivers it, and appends the outcome.

Two workers never run the same attempt: the claim is an append that only one of them can make
(optimistic concurrency on the execution's stream). A worker that dies leaves a lease that runs
out; the next worker records that attempt as failed and takes the next one. See docs/dispatch.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections import Counter
from datetime import UTC, datetime

import aiohttp
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.appender import Appender
from ledger.codec import loads
from ledger.commands import Appended
from ledger.errors import StorageUnavailable
from ledger.events import EventData, NewEvent, execution_stream
from ledger.failures import FailureLog
from ledger.schema import events
from ledger.vault import Vault
from server.addresses import make_connector
from server.attempts import claim_events, outcome_events
from server.bystanders import append_past_bystanders
from server.config import Settings
from server.delivery import AttemptResult, Delivery, attempt
from server.due import Due, destination_key, find_due
from server.logs import fact
from server.metrics import Metrics

__all__ = ["Dispatcher"]

logger = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Dispatcher:
    """Runs due attempts, at most `dispatch_concurrency` at once, `destination_concurrency` each."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        appender: Appender,
        vault: Vault,
        settings: Settings,
        wake: asyncio.Event | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._engine = engine
        self._appender = appender
        self._vault = vault
        self._settings = settings
        self._metrics = metrics
        # Set when something may have become due: a projected batch, or a freed slot.
        self._wake = wake or asyncio.Event()
        self._rng = random.SystemRandom()
        # execution_id -> (trigger_id, destination key), for this process's bounds
        self._in_flight: dict[str, tuple[str, str]] = {}
        self._per_destination: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None
        self.worker = worker_name()
        self._failures = FailureLog(logger, "dispatch_round_failed")

    async def run(self) -> None:
        connector = make_connector(
            allow_private=self._settings.private_destinations_allowed,
            limit=self._settings.dispatch_concurrency,
            limit_per_host=self._settings.destination_concurrency,
        )
        jar = aiohttp.DummyCookieJar()  # one destination's cookies never reach another request
        async with (
            aiohttp.ClientSession(connector=connector, cookie_jar=jar) as session,
            asyncio.TaskGroup() as tasks,
        ):
            self._session = session
            fact(logger, "dispatcher_started", worker=self.worker)
            while True:
                self._wake.clear()
                if not await self._round(tasks):
                    await self._sleep(self._settings.dispatch_poll_s)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _round(self, tasks: asyncio.TaskGroup) -> int:
        """Start what is due and fits the bounds; the number of steps started."""
        free = self._settings.dispatch_concurrency - len(self._in_flight)
        if free <= 0:
            return 0
        try:
            async with self._engine.connect() as conn:
                page = await find_due(
                    conn,
                    now=datetime.now(UTC),
                    limit=free,
                    skip_executions=list(self._in_flight),
                    skip_triggers=self._saturated_triggers(),
                )
        except Exception as exc:  # noqa: BLE001 - the loop outlives a database outage
            self._failures.failed(exc)
            await asyncio.sleep(max(self._settings.dispatch_poll_s, 1.0))
            return 0
        self._failures.succeeded()
        started = 0
        for due in page:
            key = destination_key(due)
            if self._per_destination[key] >= self._settings.destination_concurrency:
                continue
            self._in_flight[due.execution_id] = (due.trigger_id, key)
            self._per_destination[key] += 1
            tasks.create_task(self._step(due, key), name=f"dispatch-{due.execution_id}")
            started += 1
        return started

    def _saturated_triggers(self) -> list[str]:
        limit = self._settings.destination_concurrency
        return sorted(
            {
                trigger
                for trigger, key in self._in_flight.values()
                if self._per_destination[key] >= limit
            }
        )

    async def _step(self, due: Due, key: str) -> None:
        try:
            await self._advance(due)
        except Exception:  # noqa: BLE001 - one execution's trouble never stops the others
            logger.exception("evt=dispatch_failed execution_id=%s", due.execution_id)
        finally:
            del self._in_flight[due.execution_id]
            self._per_destination[key] -= 1
            if self._per_destination[key] <= 0:
                del self._per_destination[key]
            self._wake.set()

    async def _advance(self, due: Due) -> None:
        claim = claim_events(
            due, now=datetime.now(UTC), lease_s=self._settings.lease_s, worker=self.worker
        )
        deadline = time.monotonic() + due.timeout_s + self._settings.lease_s
        claimed = await self._append(due, claim.events, due.version)
        if claimed is None:
            return  # another worker took this step first
        if due.status == "running":
            fact(
                logger,
                "lease_expired",
                logging.WARNING,
                execution_id=due.execution_id,
                trigger_id=due.trigger_id,
                attempt=due.attempts,
            )
        if claim.attempt is None:
            _log_dead_letter(due, claim.events)
            return
        result = await self._deliver(due)
        outcome = outcome_events(
            result, attempt=claim.attempt, policy=due.policy, now=datetime.now(UTC), rng=self._rng
        )
        if await self._append_outcome(due, outcome, claimed[-1].version, deadline) is None:
            fact(
                logger,
                "attempt_outcome_lost",
                logging.WARNING,
                execution_id=due.execution_id,
                attempt=claim.attempt,
                reason="lease taken over",
            )
            return
        _log_attempt(due, claim.attempt, result, outcome)
        if self._metrics is not None:
            category = outcome[0].to_data().get("error_category")
            label = "succeeded" if result.is_success else f"failed_{category}"
            self._metrics.observe_attempt(due.trigger_id, label, result.duration_ms / 1000)

    async def _append(
        self, due: Due, payloads: list[EventData], expected: int
    ) -> list[Appended] | None:
        stream = execution_stream(due.execution_id)
        new = [NewEvent.of(stream, due.trigger_id, payload) for payload in payloads]
        appended = await append_past_bystanders(self._appender, self._engine, new, expected)
        if appended is None:
            fact(
                logger,
                "claim_lost",
                logging.DEBUG,
                execution_id=due.execution_id,
                expected=expected,
            )
        return appended

    async def _append_outcome(
        self, due: Due, payloads: list[EventData], expected: int, deadline: float
    ) -> list[Appended] | None:
        """The outcome must land while the lease holds: retry through a short storage outage."""
        delay = 0.2
        while True:
            try:
                return await self._append(due, payloads, expected)
            except StorageUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _deliver(self, due: Due) -> AttemptResult:
        try:
            delivery = await self._delivery(due)
        except Exception as exc:  # noqa: BLE001 - e.g. a secret the key cannot open: an outcome
            return AttemptResult(status_code=None, error=exc, duration_ms=0.0)
        if self._session is None:
            raise RuntimeError("the dispatcher's HTTP session is opened by run()")
        return await attempt(self._session, delivery)

    async def _delivery(self, due: Due) -> Delivery:
        destination = due.destination or {}
        async with self._engine.connect() as conn:
            query = sa.select(events.c.data).where(events.c.id == due.received_event_id)
            received = loads((await conn.execute(query)).scalar_one())
        ciphertext = destination.get("secret_ciphertext")
        sealed = destination.get("sealed_headers") or {}
        return Delivery.of(
            received,
            destination,
            message_id=due.execution_id,
            key=due.idempotency_key or due.execution_id,
            secret=self._vault.decrypt(ciphertext) if ciphertext else None,
            # Configured before header values were sealed: kept in clear.
            headers=dict(destination.get("headers") or {})
            | {name: self._vault.decrypt(value) for name, value in sealed.items()},
        )


def _log_attempt(due: Due, number: int, result: AttemptResult, outcome: list[EventData]) -> None:
    failed = outcome[0].to_data()
    fact(
        logger,
        "attempt",
        execution_id=due.execution_id,
        trigger_id=due.trigger_id,
        attempt=number,
        outcome="succeeded" if result.is_success else "failed",
        status_code=result.status_code,
        error_category=failed.get("error_category"),
        duration_ms=result.duration_ms,
        retry_at=failed.get("retry_at"),
    )
    if len(outcome) > 1:
        _log_dead_letter(due, outcome)


def _log_dead_letter(due: Due, appended: list[EventData]) -> None:
    dead = appended[-1].to_data()
    fact(
        logger,
        "dead_lettered",
        logging.WARNING,
        execution_id=due.execution_id,
        trigger_id=due.trigger_id,
        reason=dead.get("reason"),
        error_category=dead.get("error_category"),
    )
