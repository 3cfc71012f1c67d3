"""Values tests build again and again: deliveries as the receiver would make them, events as
the log gives them back."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from ledger.commands import RecordDelivery
from ledger.events import RecordedEvent, WebhookReceived, uuid7

MOMENT = datetime(2026, 11, 29, 12, tzinfo=UTC)


def delivery(
    key: str | None, body: str = "{}", trigger_id: str = "t", *, initial_status: str = "pending"
) -> RecordDelivery:
    received = WebhookReceived(
        execution_id=uuid7(),
        headers={},
        body=body,
        content_type="application/json",
        body_sha256=hashlib.sha256(body.encode()).hexdigest(),
        initial_status=initial_status,
    )
    return RecordDelivery.of(trigger_id=trigger_id, idempotency_key=key, received=received)


def recorded_event(
    seq: int,
    type_: str,
    data: dict[str, Any],
    *,
    stream: str = "execution-x",
    version: int | None = None,
    idempotency_key: str | None = None,
    recorded_at: datetime | None = None,
) -> RecordedEvent:
    """An event as read from the log, of trigger `t`: version `seq` and recorded `seq` seconds
    after MOMENT unless given."""
    return RecordedEvent(
        seq=seq,
        id=uuid7(),
        stream=stream,
        version=seq if version is None else version,
        type=type_,
        trigger_id="t",
        idempotency_key=idempotency_key,
        data=data,
        meta={},
        recorded_at=MOMENT + timedelta(seconds=seq) if recorded_at is None else recorded_at,
        hash="",
    )
