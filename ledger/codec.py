"""JSON in and out of the store (orjson), and the canonical bytes the hash chain covers."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import orjson

GENESIS_HASH = "0" * 64


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(text: str | bytes) -> Any:
    return orjson.loads(text)


def format_time(moment: datetime) -> str:
    """ISO-8601 UTC with microseconds and a `Z`: sorts as text, reads the same on both backends."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """An ISO-8601 time in UTC; one without an offset is taken as UTC. ValueError for what is
    not one, or what UTC cannot hold (0001-01-01T00:00:00+14:00 is before year 1 there)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is outside the years 1 to 9999 in UTC") from None


def canonical_bytes(
    *,
    seq: int,
    id: str,
    stream: str,
    version: int,
    type: str,
    trigger_id: str,
    idempotency_key: str | None,
    data: str,
    meta: str,
    recorded_at: str,
) -> bytes:
    """The bytes an event's hash covers: every column but the hash, `data`/`meta` as stored text."""
    return orjson.dumps(
        [seq, id, stream, version, type, trigger_id, idempotency_key, data, meta, recorded_at]
    )


def chain_hash(previous: str, canonical: bytes) -> str:
    return hashlib.sha256(previous.encode() + canonical).hexdigest()
