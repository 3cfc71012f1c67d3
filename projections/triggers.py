"""`triggers`: the current configuration of every trigger, folded from the trigger.* events."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ledger.codec import dumps
from ledger.events import RecordedEvent
from ledger.schema import BigInt, UTCDateTime, metadata

NAME = "triggers"
Row = dict[str, Any]


def columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("secrets", sa.Text, nullable=False),  # JSON list of {ciphertext, expires_at}
        sa.Column("destination", sa.Text),  # JSON, destination secret encrypted
        sa.Column("idempotency_key_path", sa.String(255)),
        sa.Column("filter", sa.Text),
        sa.Column("retry", sa.Text),
        sa.Column("rate_limit", sa.Text),  # JSON {per_s, burst}, or NULL: no ingestion limit
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("last_seq", BigInt, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
    ]


table = sa.Table(NAME, metadata, *columns())


def shadow_table(name: str) -> sa.Table:
    return sa.Table(name, sa.MetaData(), *columns())


def _json(value: Any) -> str | None:
    return None if value is None else dumps(value)


def _configured(row: Row | None, event: RecordedEvent) -> Row:
    data = event.data
    return {
        "id": data["id"],
        "source": data["source"],
        "secrets": dumps(data.get("secrets") or []),
        "destination": _json(data.get("destination")),
        "idempotency_key_path": data.get("idempotency_key_path"),
        "filter": _json(data.get("filter")),
        "retry": _json(data.get("retry")),
        "rate_limit": _json(data.get("rate_limit")),
        "paused": row["paused"] if row else False,
        "deleted": False,
        "created_at": row["created_at"] if row else event.recorded_at,
    }


def evolve(row: Row | None, event: RecordedEvent) -> Row | None:
    """The trigger's row after `event` (pure)."""
    if row is not None and event.seq <= row["last_seq"]:
        return row
    match event.type:
        case "trigger.registered" | "trigger.updated":
            changed: Row = (row or {}) | _configured(row, event)
        case "trigger.paused" if row:
            changed = row | {"paused": True}
        case "trigger.resumed" if row:
            changed = row | {"paused": False}
        case "trigger.deleted" if row:
            changed = row | {"deleted": True}
        case _:
            return row
    return changed | {
        "updated_at": event.recorded_at,
        "last_seq": event.seq,
        "version": event.version,
    }


def key_of(event: RecordedEvent) -> str | None:
    return event.trigger_id if event.stream.startswith("trigger-") else None
