"""What the dispatcher appends to an execution's stream: the claim of an attempt, its outcome, and
dead letters. Pure: given the execution as the projection shows it at one stream version, the
events to append with that version expected.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from ledger.codec import format_time
from ledger.events import (
    EventData,
    ExecutionDeadLettered,
    ExecutionFailed,
    ExecutionStarted,
    ExecutionSucceeded,
)
from server.delivery import AttemptResult
from server.due import Due
from server.policy import RetryPolicy, classify, next_delay, parse_retry_after

__all__ = ["Claim", "claim_events", "outcome_events"]

LEASE_EXPIRED = "lease expired: the worker running this attempt stopped; its outcome is unknown"


@dataclass(frozen=True, slots=True)
class Claim:
    """The events that take the next step; `attempt` is None when that step is a dead letter."""

    events: list[EventData]
    attempt: int | None


def _dead_letter(reason: str, category: str) -> ExecutionDeadLettered:
    return ExecutionDeadLettered(reason=reason, error_category=category)


def claim_events(due: Due, *, now: datetime, lease_s: float, worker: str) -> Claim:
    """Claim the next attempt of `due`, or dead-letter it when no attempt may follow."""
    events: list[EventData] = []
    if due.status == "running":
        # The lease ran out: the attempt's worker is gone. Record that attempt as failed first.
        events.append(
            ExecutionFailed(
                attempt=due.attempts,
                error_category="transient",
                error=LEASE_EXPIRED,
                status_code=None,
                retry_at=None,
            )
        )
    if due.trigger_deleted:
        return Claim([*events, _dead_letter("trigger_deleted", "permanent")], None)
    if due.destination is None:
        return Claim([*events, _dead_letter("no_destination", "permanent")], None)
    if due.attempts >= due.policy.max_attempts:
        return Claim([*events, _dead_letter("attempts_exhausted", "transient")], None)
    attempt = due.attempts + 1
    lease_until = now + timedelta(seconds=due.timeout_s + lease_s)
    started = ExecutionStarted(attempt=attempt, lease_until=format_time(lease_until), worker=worker)
    return Claim([*events, started], attempt)


def outcome_events(
    result: AttemptResult, *, attempt: int, policy: RetryPolicy, now: datetime, rng: random.Random
) -> list[EventData]:
    """succeeded; failed with a retry time; or failed and dead-lettered (permanent, or the last)."""
    if result.is_success and result.status_code is not None:
        return [
            ExecutionSucceeded(
                attempt=attempt, status_code=result.status_code, duration_ms=result.duration_ms
            )
        ]
    category = classify(result.status_code, result.error)
    retry_at: str | None = None
    if category == "transient" and attempt < policy.max_attempts:
        wait = parse_retry_after(result.retry_after, now=now)
        delay = next_delay(policy, attempt, retry_after_s=wait, rng=rng)
        retry_at = format_time(now + timedelta(seconds=delay))
    failed = ExecutionFailed(
        attempt=attempt,
        error_category=category,
        error=result.describe(),
        status_code=result.status_code,
        retry_at=retry_at,
        duration_ms=result.duration_ms,
    )
    if retry_at is not None:
        return [failed]
    reason = "permanent_error" if category == "permanent" else "attempts_exhausted"
    return [failed, _dead_letter(reason, category)]
