"""Reading triggers: the receiver's cache of active triggers, and the admin API's public view.

The cache keeps each trigger for a second (and is cleared by this process's own commands), so a
configuration change made through another process is seen within that second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.codec import loads
from ledger.errors import SecretUnavailable
from ledger.events import JSON
from ledger.vault import Vault
from projections.trigger_executions import table as executions
from projections.triggers import table as triggers
from server.logs import fact

logger = logging.getLogger(__name__)
CACHE_TTL_S = 1.0


@dataclass(frozen=True, slots=True)
class ActiveTrigger:
    """What the receiver needs of a trigger, secrets decrypted (in memory only)."""

    id: str
    source: str
    secrets: tuple[str, ...]
    idempotency_key_path: str | None
    filter: JSON | None
    has_destination: bool
    paused: bool
    requires_signature: bool
    rate_limit: JSON | None = None  # {"per_s", "burst"}


def config_of(row: Any) -> JSON:
    """A triggers row back into the configuration an event carries."""
    return {
        "id": row.id,
        "source": row.source,
        "secrets": loads(row.secrets),
        "destination": loads(row.destination) if row.destination else None,
        "idempotency_key_path": row.idempotency_key_path,
        "filter": loads(row.filter) if row.filter else None,
        "retry": loads(row.retry) if row.retry else None,
        "rate_limit": loads(row.rate_limit) if row.rate_limit else None,
    }


def _live_secrets(vault: Vault, sealed: list[JSON], now: datetime) -> tuple[tuple[str, ...], int]:
    """The secrets still in force, opened; and how many of them the key could not open."""
    live, unopened = [], 0
    for item in sealed:
        expires = item.get("expires_at")
        if expires and datetime.fromisoformat(expires) <= now:
            continue
        try:
            live.append(vault.decrypt(item["ciphertext"]))
        except SecretUnavailable:
            unopened += 1
    return tuple(live), unopened


def _seconds_to_next_expiry(row: Any, now: datetime) -> float:
    if row is None or row.deleted:
        return CACHE_TTL_S
    ends = [
        (datetime.fromisoformat(item["expires_at"]) - now).total_seconds()
        for item in loads(row.secrets)
        if item.get("expires_at")
    ]
    return max(0.0, min([e for e in ends if e > 0], default=CACHE_TTL_S))


async def read_trigger(conn: AsyncConnection, trigger_id: str) -> Any:
    return (await conn.execute(sa.select(triggers).where(triggers.c.id == trigger_id))).first()


class TriggerCache:
    def __init__(self, engine: AsyncEngine, vault: Vault) -> None:
        self._engine = engine
        self._vault = vault
        self._entries: dict[str, tuple[float, ActiveTrigger | None]] = {}
        self._loading: dict[str, asyncio.Future[ActiveTrigger | None]] = {}
        self._unopened: set[str] = set()  # triggers whose unopened secrets were reported

    async def get(self, trigger_id: str) -> ActiveTrigger | None:
        entry = self._entries.get(trigger_id)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        # One read per trigger at a time: when an entry expires under load, every request in
        # flight would read the same row (64 reads at c=64, queueing for pooled connections).
        loading = self._loading.get(trigger_id)
        if loading is None:
            loading = asyncio.ensure_future(self._load(trigger_id))
            self._loading[trigger_id] = loading
            loading.add_done_callback(lambda done: self._loaded(trigger_id, done))
        return await asyncio.shield(loading)

    def _loaded(self, trigger_id: str, done: asyncio.Future[ActiveTrigger | None]) -> None:
        self._loading.pop(trigger_id, None)
        if not done.cancelled():
            done.exception()  # retrieved: its waiters (if any are left) got it already

    async def _load(self, trigger_id: str) -> ActiveTrigger | None:
        now = time.monotonic()
        async with self._engine.connect() as conn:
            row = await read_trigger(conn, trigger_id)
        active = self._active(row)
        if len(self._entries) > 10_000:
            self._entries.clear()
        # A rotated-out secret must stop working when its grace ends, not up to a TTL later.
        ttl = min(CACHE_TTL_S, _seconds_to_next_expiry(row, datetime.now(UTC)))
        self._entries[trigger_id] = (now + ttl, active)
        return active

    def _active(self, row: Any) -> ActiveTrigger | None:
        if row is None or row.deleted:
            return None
        config = config_of(row)
        secrets, unopened = _live_secrets(self._vault, config["secrets"], datetime.now(UTC))
        if unopened and row.id not in self._unopened:
            # The start-up check (server/secretkey.py) makes this unlikely; never silent: its
            # signed deliveries are refused with 401 while it lasts. Said once per trigger.
            self._unopened.add(row.id)
            fact(logger, "secret_unavailable", logging.ERROR, trigger_id=row.id, secrets=unopened)
        return ActiveTrigger(
            id=row.id,
            source=row.source,
            secrets=secrets,
            idempotency_key_path=row.idempotency_key_path,
            filter=config["filter"],
            has_destination=config["destination"] is not None,
            paused=row.paused,
            requires_signature=bool(config["secrets"]),
            rate_limit=config["rate_limit"],
        )

    def forget(self, trigger_id: str) -> None:
        self._entries.pop(trigger_id, None)


def destination_header_names(destination: JSON) -> list[str]:
    """Names of a destination's headers: sealed, or in clear as configurations before sealing
    kept them."""
    return [*(destination.get("sealed_headers") or {}), *(destination.get("headers") or {})]


def public_view(row: Any, counts: dict[str, int] | None = None) -> JSON:
    """A trigger as the admin API shows it: never a secret, only whether there is one."""
    config = config_of(row)
    destination = config["destination"]
    view: JSON = {
        "id": row.id,
        "source": row.source,
        "has_secret": bool(config["secrets"]),
        "destination": None
        if destination is None
        else {
            "url": destination["url"],
            "timeout_s": destination.get("timeout_s"),
            "has_secret": bool(destination.get("secret_ciphertext")),
            "headers": sorted(destination_header_names(destination)),
        },
        "idempotency_key_path": row.idempotency_key_path,
        "filter": config["filter"],
        "retry": config["retry"],
        "rate_limit": config["rate_limit"],
        "paused": row.paused,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
    }
    if counts is not None:
        view["counts"] = counts
    return view


async def trigger_counts(
    conn: AsyncConnection, trigger_id: str | None = None
) -> dict[str, dict[str, int]]:
    query = sa.select(
        executions.c.trigger_id,
        sa.func.count(),
        sa.func.coalesce(sa.func.sum(executions.c.duplicate_count), 0),
        sa.func.coalesce(
            sa.func.sum(sa.case((executions.c.status == "dead_lettered", 1), else_=0)), 0
        ),
    ).group_by(executions.c.trigger_id)
    if trigger_id:
        query = query.where(executions.c.trigger_id == trigger_id)
    return {
        tid: {"received": int(n), "duplicates": int(d), "dead_lettered": int(x)}
        for tid, n, d, x in (await conn.execute(query)).all()
    }


async def list_triggers(conn: AsyncConnection) -> list[JSON]:
    rows = (
        await conn.execute(sa.select(triggers).where(~triggers.c.deleted).order_by(triggers.c.id))
    ).all()
    counts = await trigger_counts(conn)
    empty = {"received": 0, "duplicates": 0, "dead_lettered": 0}
    return [public_view(row, counts.get(row.id, empty)) for row in rows]
