"""Values tests build again and again: deliveries as the receiver would make them."""

from __future__ import annotations

import hashlib

from ledger.commands import RecordDelivery
from ledger.events import WebhookReceived, uuid7


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
    return RecordDelivery(trigger_id=trigger_id, idempotency_key=key, received=received)
