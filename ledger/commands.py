"""What the appender is asked to do, and how each request turns into events under the append lock.

Planning is pure: given the stream versions and the idempotency keys already in the log (read
under the lock), each command yields the events to insert, or the error it must fail with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ledger.codec import dumps, loads
from ledger.errors import StreamVersionConflict
from ledger.events import (
    JSON,
    Encoded,
    NewEvent,
    WebhookDuplicate,
    WebhookReceived,
    execution_stream,
    matching_duplicate_data,
    new_event,
    payload_of,
)
from ledger.fields import Fields


@dataclass(frozen=True, slots=True)
class Original:
    """The first webhook.received of a (trigger_id, key)."""

    event_id: str
    execution_id: str
    body_sha256: str


@dataclass(slots=True)
class PlanState:
    versions: dict[str, int]
    originals: dict[tuple[str, str], Original]

    def next_version(self, stream: str) -> int:
        version = self.versions.get(stream, 0) + 1
        self.versions[stream] = version
        return version


@dataclass(frozen=True, slots=True)
class Appended:
    """Where one appended event landed."""

    event_id: str
    stream: str
    version: int
    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendEvents:
    """Append events to one stream; `expected_version` (None: any) guards optimistic concurrency."""

    events: list[NewEvent]
    expected_version: int | None = None

    @property
    def streams(self) -> list[str]:
        return [self.events[0].stream] if self.events else []

    def plan(self, state: PlanState) -> list[tuple[NewEvent, int]]:
        stream = self.events[0].stream
        current = state.versions.get(stream, 0)
        if self.expected_version is not None and self.expected_version != current:
            raise StreamVersionConflict(stream, self.expected_version, current)
        return [(event, state.next_version(stream)) for event in self.events]


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    event_id: str
    execution_id: str
    is_duplicate: bool
    original_event_id: str | None
    seq: int = 0
    body_matches: bool = True


_OUTCOME = Fields(DeliveryOutcome)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordDelivery:
    """A delivery: its webhook.received event, appended as it is when its key is new, or a
    webhook.duplicate on the original's stream when the key was already received.

    Made by `of`, where the request is read: the event's data and meta are encoded there, as
    they are stored, outside the append lock. With ingest workers that work is the worker's, and
    what crosses the ledger link is these few strings. The events' ids are the appender's (a
    command submitted again appends new events).
    """

    trigger_id: str
    idempotency_key: str | None
    execution_id: str  # the execution it opens when its key is new
    body_sha256: str
    data: str  # the webhook.received's data, encoded as stored
    meta: str  # the meta of either event, encoded as stored

    @classmethod
    def of(
        cls,
        *,
        trigger_id: str,
        idempotency_key: str | None,
        received: WebhookReceived,
        meta: JSON | None = None,
    ) -> RecordDelivery:
        return cls(
            trigger_id=trigger_id,
            idempotency_key=idempotency_key,
            execution_id=received.execution_id,
            body_sha256=received.body_sha256,
            data=dumps(received.to_data()),
            meta=dumps(meta or {}),
        )

    @property
    def received(self) -> WebhookReceived:
        """The webhook.received payload, decoded."""
        payload = payload_of(WebhookReceived.TYPE, loads(self.data))
        assert isinstance(payload, WebhookReceived)
        return payload

    @property
    def key(self) -> tuple[str, str] | None:
        return (self.trigger_id, self.idempotency_key) if self.idempotency_key else None

    def plan(self, state: PlanState) -> list[tuple[NewEvent, int]]:
        key = self.key
        original = state.originals.get(key) if key else None
        if original is None:
            event = self._received_event()
            if key:
                state.originals[key] = Original(event.id, self.execution_id, self.body_sha256)
        else:
            event = self._duplicate_event(original)
        return [(event, state.next_version(event.stream))]

    def _received_event(self) -> NewEvent:
        return new_event(
            execution_stream(self.execution_id),
            WebhookReceived.TYPE,
            self.trigger_id,
            Encoded(self.data),
            self.idempotency_key,
            Encoded(self.meta),
        )

    def _duplicate_event(self, original: Original) -> NewEvent:
        if original.body_sha256 == self.body_sha256:
            data = matching_duplicate_data(
                original.event_id, original.execution_id, self.body_sha256
            )
        else:  # the body and headers are kept as evidence: decoded only then
            received = self.received
            data = WebhookDuplicate(
                original_event_id=original.event_id,
                execution_id=original.execution_id,
                body_sha256=self.body_sha256,
                body_matches=False,
                body=received.body,
                body_encoding=received.body_encoding,
                headers=received.headers,
            ).to_data()
        return new_event(
            execution_stream(original.execution_id),
            WebhookDuplicate.TYPE,
            self.trigger_id,
            data,
            self.idempotency_key,
            Encoded(self.meta),
        )

    def outcome(self, planned: list[tuple[NewEvent, int]], seqs: list[int]) -> DeliveryOutcome:
        # Restored through its slots (`ledger.fields`): one a delivery, in the append.
        event = planned[0][0]
        if event.type == WebhookReceived.TYPE:
            return _OUTCOME.made((event.id, self.execution_id, False, None, seqs[0], True))
        data = event.data
        assert isinstance(data, dict)  # a duplicate's data is made by `_duplicate_event`
        return _OUTCOME.made(
            (
                event.id,
                data["execution_id"],
                True,
                data["original_event_id"],
                seqs[0],
                data["body_matches"],
            )
        )


Command = AppendEvents | RecordDelivery


def result_of(command: Command, planned: list[tuple[NewEvent, int]], seqs: list[int]) -> Any:
    if isinstance(command, RecordDelivery):
        return command.outcome(planned, seqs)
    return [
        Appended(event.id, event.stream, version, seq)
        for (event, version), seq in zip(planned, seqs, strict=True)
    ]
