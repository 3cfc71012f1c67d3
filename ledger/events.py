"""Event types of the log: one frozen dataclass per stored type name, and the registry between them.

A stored type name never changes; evolve with a new type or an upcaster.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import orjson

from ledger.errors import UnknownEventType
from ledger.fields import Fields

JSON = dict[str, Any]
# A JSON object already encoded, stored as it is (`ledger.codec.dumps` passes it through): what
# a NewEvent's data or meta may be when it was encoded before the append (`RecordDelivery.of`).
Encoded = orjson.Fragment


_RAND_B = (1 << 62) - 1
_VERSION_AND_VARIANT = 0x7 << 76 | 0x2 << 62  # version 7, RFC 4122 variant
_last_uuid7 = 0  # this process's last, as an integer
_uuid7_lock = threading.Lock()  # two threads must not both take the last one's successor


def _forget_last_uuid7() -> None:
    # A forked child would otherwise go on from its parent's last id, as the parent does: in the
    # same millisecond, both would make its successor.
    global _last_uuid7
    _last_uuid7 = 0


os.register_at_fork(after_in_child=_forget_last_uuid7)


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7): 48 bits of Unix milliseconds, then randomness;
    each one after the last of this process (RFC 9562's method 2: within a millisecond, or when
    the clock steps back, the last one's random part plus one), so that ids made one after the
    other sort in that order (the executions API lists the newest first by id)."""
    global _last_uuid7
    ms = time.time_ns() // 1_000_000
    # An id, not a secret: Python's generator (seeded from the system, reseeded in a forked child)
    # spares a getrandom syscall on every delivery.
    rand = random.getrandbits(74)  # noqa: S311 - 12 bits of rand_a, 62 of rand_b
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | (rand >> 62) << 64 | (rand & _RAND_B)
    value |= _VERSION_AND_VARIANT
    with _uuid7_lock:
        if value <= _last_uuid7:
            value = _after(_last_uuid7)
        _last_uuid7 = value
    text = f"{value:032x}"  # str(uuid.UUID(int=value)), at a fifth of the cost: two per delivery
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _after(last: int) -> int:
    """The version-7 UUID next after `last`: its random part plus one, carried past the version
    and variant bits (into rand_a, then into the milliseconds)."""
    rand_b = (last & _RAND_B) + 1
    rand_a = last >> 64 & 0xFFF
    ms = last >> 80
    if rand_b > _RAND_B:
        rand_b, rand_a = 0, rand_a + 1
        if rand_a > 0xFFF:
            rand_a, ms = 0, ms + 1
    return (ms & 0xFFFF_FFFF_FFFF) << 80 | rand_a << 64 | rand_b | _VERSION_AND_VARIANT


_EXECUTION_PREFIX = "execution-"


def execution_stream(execution_id: str) -> str:
    return f"{_EXECUTION_PREFIX}{execution_id}"


def execution_of_stream(stream: str) -> str | None:
    """The execution whose stream `stream` is (None: not an execution's)."""
    return stream[len(_EXECUTION_PREFIX) :] if stream.startswith(_EXECUTION_PREFIX) else None


def trigger_stream(trigger_id: str) -> str:
    return f"trigger-{trigger_id}"


class EventData:
    """Base of the typed payloads; `TYPE` is the stored type name."""

    TYPE: ClassVar[str]

    def to_data(self) -> JSON:
        # What dataclasses.asdict gives for JSON-native fields, ~7x faster: asdict sends every
        # leaf through copy.deepcopy, and this runs for each delivery inside the append lock.
        names = _FIELD_NAMES.get(type(self))
        if names is None:
            names = _FIELD_NAMES[type(self)] = tuple(f.name for f in dataclasses.fields(self))  # type: ignore[arg-type]
        data = {}
        for name in names:
            value = getattr(self, name)
            data[name] = value if type(value) in _ATOMS else _json_copy(value)
        return data


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_ATOMS = frozenset({str, int, float, bool, type(None)})  # immutable: shared, not copied


def _json_copy(value: Any) -> Any:
    """A copy of nested dicts and lists; strings and numbers are immutable and shared."""
    if isinstance(value, dict):
        return {
            key: item if type(item) in _ATOMS else _json_copy(item) for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(item if type(item) in _ATOMS else _json_copy(item) for item in value)
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerConfigured(EventData):
    """trigger.registered / trigger.updated: the whole configuration after the change."""

    id: str
    source: str
    secrets: list[JSON] = field(default_factory=list)  # [{"ciphertext", "expires_at"}], never clear
    destination: JSON | None = None  # {"url", "timeout_s", "sealed_headers", "secret_ciphertext"}
    idempotency_key_path: str | None = None
    filter: JSON | None = None
    retry: JSON | None = None
    rate_limit: JSON | None = None  # {"per_s", "burst"}: ingestion limit, None for none


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerRegistered(TriggerConfigured):
    TYPE: ClassVar[str] = "trigger.registered"


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerUpdated(TriggerConfigured):
    TYPE: ClassVar[str] = "trigger.updated"


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerPaused(EventData):
    TYPE: ClassVar[str] = "trigger.paused"
    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerResumed(EventData):
    TYPE: ClassVar[str] = "trigger.resumed"
    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerDeleted(EventData):
    TYPE: ClassVar[str] = "trigger.deleted"
    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookReceived(EventData):
    TYPE: ClassVar[str] = "webhook.received"
    execution_id: str
    headers: dict[str, str]
    body: str  # the exact text received (base64 when body_encoding says so), never re-serialised
    content_type: str
    body_sha256: str
    initial_status: str  # pending | recorded | filtered, decided by the trigger at receipt
    body_encoding: str = "utf-8"


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookDuplicate(EventData):
    TYPE: ClassVar[str] = "webhook.duplicate"
    original_event_id: str
    execution_id: str
    body_sha256: str
    body_matches: bool
    body: str | None = None  # kept as evidence only when it differs
    body_encoding: str | None = None
    headers: dict[str, str] | None = None


def matching_duplicate_data(
    original_event_id: str, execution_id: str, body_sha256: str
) -> dict[str, Any]:
    """`WebhookDuplicate(..., body_matches=True).to_data()`, keys in the same order, without the
    dataclass (~3 us a duplicate in the append; nearly every duplicate's body matches)."""
    return {
        "original_event_id": original_event_id,
        "execution_id": execution_id,
        "body_sha256": body_sha256,
        "body_matches": True,
        "body": None,
        "body_encoding": None,
        "headers": None,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionStarted(EventData):
    TYPE: ClassVar[str] = "execution.started"
    attempt: int
    lease_until: str
    worker: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionSucceeded(EventData):
    TYPE: ClassVar[str] = "execution.succeeded"
    attempt: int
    status_code: int
    duration_ms: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionFailed(EventData):
    TYPE: ClassVar[str] = "execution.failed"
    attempt: int
    error_category: str
    error: str
    status_code: int | None
    retry_at: str | None
    duration_ms: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionDeadLettered(EventData):
    TYPE: ClassVar[str] = "execution.dead_lettered"
    reason: str
    error_category: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionReplayRequested(EventData):
    TYPE: ClassVar[str] = "execution.replay_requested"
    requested_by: str
    bulk_id: str | None = None


EVENT_TYPES: dict[str, type[EventData]] = {
    cls.TYPE: cls
    for cls in (
        TriggerRegistered,
        TriggerUpdated,
        TriggerPaused,
        TriggerResumed,
        TriggerDeleted,
        WebhookReceived,
        WebhookDuplicate,
        ExecutionStarted,
        ExecutionSucceeded,
        ExecutionFailed,
        ExecutionDeadLettered,
        ExecutionReplayRequested,
    )
}


def payload_of(type_name: str, data: JSON) -> EventData:
    """The typed payload of a stored event (unknown fields from newer writers are dropped)."""
    cls = EVENT_TYPES.get(type_name)
    if cls is None:
        raise UnknownEventType(type_name)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True, slots=True, kw_only=True)
class NewEvent:
    """What is appended. `version` is assigned by the store under the append lock."""

    stream: str
    type: str
    trigger_id: str
    data: JSON | Encoded
    idempotency_key: str | None = None
    meta: JSON | Encoded = field(default_factory=dict)
    id: str = field(default_factory=uuid7)

    @classmethod
    def of(cls, stream: str, trigger_id: str, payload: EventData, **kw: Any) -> NewEvent:
        return cls(
            stream=stream, type=payload.TYPE, trigger_id=trigger_id, data=payload.to_data(), **kw
        )


_NEW_EVENT = Fields(NewEvent)


def new_event(
    stream: str,
    type_: str,
    trigger_id: str,
    data: JSON | Encoded,
    idempotency_key: str | None,
    meta: JSON | Encoded,
) -> NewEvent:
    """`NewEvent(...)` with a new id, restored through its slots (`ledger.fields`): the append
    makes one a delivery, and a frozen `__init__` of keywords costs ~1.4 us more."""
    return _NEW_EVENT.made((stream, type_, trigger_id, data, idempotency_key, meta, uuid7()))


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedEvent:
    """What is read back: a NewEvent plus its place in the log and its hash."""

    seq: int
    id: str
    stream: str
    version: int
    type: str
    trigger_id: str
    idempotency_key: str | None
    data: JSON
    meta: JSON
    recorded_at: datetime
    hash: str

    @property
    def payload(self) -> EventData:
        return payload_of(self.type, self.data)
