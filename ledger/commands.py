"""What the appender is asked to do, and how each request turns into events under the append lock.

Planning is pure: given the stream versions and the idempotency keys already in the log (read
under the lock), each command yields the events to insert, or the error it must fail with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ledger.errors import StreamVersionConflict
from ledger.events import (
    JSON,
    NewEvent,
    WebhookDuplicate,
    WebhookReceived,
    execution_stream,
)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordDelivery:
    """A delivery: a new execution, or a webhook.duplicate when its key was already received."""

    trigger_id: str
    idempotency_key: str | None
    received: WebhookReceived
    meta: JSON = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str] | None:
        return (self.trigger_id, self.idempotency_key) if self.idempotency_key else None

    def plan(self, state: PlanState) -> list[tuple[NewEvent, int]]:
        original = state.originals.get(self.key) if self.key else None
        if original is None:
            event = self._received_event()
            if self.key:
                state.originals[self.key] = Original(
                    event.id, self.received.execution_id, self.received.body_sha256
                )
            return [(event, state.next_version(event.stream))]
        event = self._duplicate_event(original)
        return [(event, state.next_version(event.stream))]

    def _received_event(self) -> NewEvent:
        return NewEvent.of(
            execution_stream(self.received.execution_id),
            self.trigger_id,
            self.received,
            idempotency_key=self.idempotency_key,
            meta=self.meta,
        )

    def _duplicate_event(self, original: Original) -> NewEvent:
        matches = original.body_sha256 == self.received.body_sha256
        duplicate = WebhookDuplicate(
            original_event_id=original.event_id,
            execution_id=original.execution_id,
            body_sha256=self.received.body_sha256,
            body_matches=matches,
            body=None if matches else self.received.body,
            body_encoding=None if matches else self.received.body_encoding,
            headers=None if matches else self.received.headers,
        )
        return NewEvent.of(
            execution_stream(original.execution_id),
            self.trigger_id,
            duplicate,
            idempotency_key=self.idempotency_key,
            meta=self.meta,
        )

    def outcome(self, planned: list[tuple[NewEvent, int]], seqs: list[int]) -> DeliveryOutcome:
        event = planned[0][0]
        if event.type == WebhookReceived.TYPE:
            return DeliveryOutcome(event.id, self.received.execution_id, False, None, seqs[0])
        data = event.data
        return DeliveryOutcome(
            event.id,
            data["execution_id"],
            True,
            data["original_event_id"],
            seqs[0],
            data["body_matches"],
        )


Command = AppendEvents | RecordDelivery


def result_of(command: Command, planned: list[tuple[NewEvent, int]], seqs: list[int]) -> Any:
    if isinstance(command, RecordDelivery):
        return command.outcome(planned, seqs)
    return [
        Appended(event.id, event.stream, version, seq)
        for (event, version), seq in zip(planned, seqs, strict=True)
    ]
