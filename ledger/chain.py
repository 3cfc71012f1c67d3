"""The hash chain's audit: recompute every event's hash in `seq` order and name the first break.

Each event's `hash` is SHA-256 over the previous event's hash and the event's canonical bytes
(`ledger.codec`). The verifier reads the stored columns as stored (data and meta as text, never
re-serialised) in bounded batches, so memory stays flat whatever the log's length. It can start
from a checkpoint an auditor kept (the seq of an event and its hash), so that verifying new events
does not reread the whole log; the checkpoint's own event is checked against that hash too.

Deleting the newest events leaves a shorter chain that is still valid: only a checkpoint kept
outside the database (or the auditor's last known head) can show that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.codec import GENESIS_HASH, canonical_bytes, chain_hash, format_time
from ledger.schema import events

Progress = Callable[[int, int, int], None]  # (seq reached, target seq, events checked)

HASH_MISMATCH = "hash_mismatch"  # the stored event or its hash differs from what was appended
GAP = "gap"  # an event is missing: seq jumps
CHECKPOINT_MISMATCH = "checkpoint_mismatch"  # the checkpoint's event now carries another hash
CHECKPOINT_MISSING = "checkpoint_missing"  # the checkpoint's event is not in the log


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A position an auditor signed off: event `seq` had hash `hash`."""

    seq: int
    hash: str


GENESIS = Checkpoint(0, GENESIS_HASH)


@dataclass(frozen=True, slots=True)
class Break:
    """The first place where the log does not match its chain, and why."""

    seq: int
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    checked: int  # events whose hash was recomputed and matched
    first_bad: Break | None
    last_good: Checkpoint  # the furthest position verified: a checkpoint for next time

    def to_json(self) -> dict[str, Any]:
        bad = self.first_bad
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_bad": None
            if bad is None
            else {"seq": bad.seq, "reason": bad.reason, "message": bad.message},
            "last_good": {"seq": self.last_good.seq, "hash": self.last_good.hash},
        }


_COLUMNS = [
    events.c.seq,
    events.c.id,
    events.c.stream,
    events.c.version,
    events.c.type,
    events.c.trigger_id,
    events.c.idempotency_key,
    events.c.data,
    events.c.meta,
    events.c.recorded_at,
    events.c.hash,
]


def recompute(previous: str, row: Any) -> str:
    """The hash `row` must carry when `previous` is the hash of the event before it."""
    canonical = canonical_bytes(
        seq=row.seq,
        id=row.id,
        stream=row.stream,
        version=row.version,
        type=row.type,
        trigger_id=row.trigger_id,
        idempotency_key=row.idempotency_key,
        data=row.data,
        meta=row.meta,
        recorded_at=format_time(row.recorded_at),
    )
    return chain_hash(previous, canonical)


class _Walk:
    """The fold over rows in seq order: where the chain stands, and the first break if any."""

    def __init__(self, start: Checkpoint) -> None:
        self.position = start
        self.checked = 0
        self.first_bad: Break | None = None

    def take(self, rows: Sequence[Any]) -> bool:
        """Fold in a batch; False once a break is found (the rest is not looked at)."""
        for row in rows:
            expected = self.position.seq + 1
            if row.seq != expected:
                missing = f"{expected}" if row.seq == expected + 1 else f"{expected}..{row.seq - 1}"
                self.first_bad = Break(
                    expected, GAP, f"seq {missing} missing: the log jumps to {row.seq}"
                )
                return False
            computed = recompute(self.position.hash, row)
            if computed != row.hash:
                self.first_bad = Break(
                    row.seq,
                    HASH_MISMATCH,
                    f"event {row.id} at seq {row.seq}: stored hash {row.hash[:16]}… but its "
                    f"content and the previous hash give {computed[:16]}…",
                )
                return False
            self.position = Checkpoint(row.seq, row.hash)
            self.checked += 1
        return True


async def _check_start(conn: AsyncConnection, start: Checkpoint) -> Break | None:
    if start.seq == 0:
        return (
            None
            if start.hash == GENESIS_HASH
            else Break(0, CHECKPOINT_MISMATCH, "seq 0 is the genesis: its hash is 64 zeros")
        )
    # The checkpoint's event and the one before it: the event's content is checked too, for
    # the events after it chain from its stored hash alone, and would verify had its content
    # been rewritten with its hash left as it was.
    rows = await _read_batch(conn, start.seq - 2, start.seq, 2)
    if not rows or rows[-1].seq != start.seq:
        return Break(
            start.seq, CHECKPOINT_MISSING, f"the checkpoint's event seq {start.seq} is gone"
        )
    stored = rows[-1].hash
    if stored != start.hash:
        return Break(
            start.seq,
            CHECKPOINT_MISMATCH,
            f"seq {start.seq} now has hash {stored[:16]}…, the checkpoint says {start.hash[:16]}…",
        )
    previous = GENESIS_HASH if start.seq == 1 else rows[0].hash if len(rows) == 2 else None
    if previous is None or recompute(previous, rows[-1]) != stored:
        return Break(
            start.seq,
            CHECKPOINT_MISMATCH,
            f"seq {start.seq} carries the checkpoint's hash, but its content (or the event "
            "before it) is not what was signed off",
        )
    return None


async def _read_batch(conn: AsyncConnection, after: int, until: int, limit: int) -> Sequence[Any]:
    query = (
        sa.select(*_COLUMNS)
        .where(events.c.seq > after, events.c.seq <= until)
        .order_by(events.c.seq)
        .limit(limit)
    )
    return (await conn.execute(query)).all()


async def verify_chain(
    engine: AsyncEngine,
    *,
    start: Checkpoint = GENESIS,
    batch: int = 5000,
    progress: Progress | None = None,
) -> Verification:
    """Recompute the chain from `start` to the head of the log as it is now."""
    async with engine.connect() as conn:
        bad = await _check_start(conn, start)
        until = (
            await conn.execute(sa.select(sa.func.coalesce(sa.func.max(events.c.seq), 0)))
        ).scalar_one()
    walk = _Walk(start)
    walk.first_bad = bad
    while walk.first_bad is None and walk.position.seq < until:
        # Each batch in its own short transaction: the log is append-only, what was read stays true.
        async with engine.connect() as conn:
            rows = await _read_batch(conn, walk.position.seq, until, batch)
        if not rows:
            # The rows up to `until` existed when it was read: they were deleted meanwhile.
            walk.first_bad = Break(
                walk.position.seq + 1, GAP, f"seq {walk.position.seq + 1}..{until} missing"
            )
            break
        walk.take(rows)
        if progress:
            progress(walk.position.seq, until, walk.checked)
    return Verification(walk.first_bad is None, walk.checked, walk.first_bad, walk.position)
