"""What every bench run ends with: correctness was not traded for speed.

- every acknowledged delivery (202) is in the log once, as `webhook.received`, and every
  acknowledged duplicate (200) as `webhook.duplicate`; one `webhook.received` per key;
- what the log holds beyond the acknowledged is at most what was in flight when the load stopped;
- every projection is at the head of the log and equals a rebuild from the log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.schema import events
from ledger.store import read_last_seq
from projections.rebuild import rebuild
from projections.registry import PROJECTIONS
from projections.runner import read_checkpoints


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """What the load generators were told, over the whole run of one server."""

    new_ids: Sequence[str]
    dup_ids: Sequence[str]
    in_flight: int  # upper bound of requests cut off unanswered (connections per run, timeouts)


async def _types_by_id(conn: AsyncConnection, trigger_id: str, after_seq: int) -> dict[str, str]:
    query = sa.select(events.c.id, events.c.type).where(
        events.c.trigger_id == trigger_id, events.c.seq > after_seq
    )
    return {event_id: kind for event_id, kind in (await conn.execute(query)).all()}


async def _received_keys(conn: AsyncConnection, trigger_id: str) -> tuple[int, int]:
    query = sa.select(sa.func.count(), sa.func.count(sa.distinct(events.c.idempotency_key))).where(
        events.c.trigger_id == trigger_id, events.c.type == "webhook.received"
    )
    count, distinct = (await conn.execute(query)).one()
    return int(count), int(distinct)


def _logged_as(ids: Sequence[str], types: dict[str, str], kind: str) -> Check:
    missing = [i for i in ids if types.get(i) != kind]
    repeated = len(ids) - len(set(ids))
    detail = (
        f"{len(ids)} acknowledged, {len(missing)} not in the log as {kind}, {repeated} repeated"
    )
    return Check(f"acknowledged {kind} in the log once", not missing and not repeated, detail)


def _surplus(name: str, logged: int, acknowledged: int, in_flight: int) -> Check:
    surplus = logged - acknowledged
    detail = f"{logged} in the log, {acknowledged} acknowledged, {in_flight} at most in flight"
    return Check(name, 0 <= surplus <= in_flight, detail)


async def check_log(
    engine: AsyncEngine, trigger_id: str, acks: Acknowledged, *, after_seq: int = 0
) -> list[Check]:
    """The log against what was acknowledged since `after_seq` (the log may hold more before)."""
    async with engine.connect() as conn:
        types = await _types_by_id(conn, trigger_id, after_seq)
        received, distinct_keys = await _received_keys(conn, trigger_id)
    duplicates = sum(1 for kind in types.values() if kind == "webhook.duplicate")
    received_since = sum(1 for kind in types.values() if kind == "webhook.received")
    return [
        _logged_as(acks.new_ids, types, "webhook.received"),
        _logged_as(acks.dup_ids, types, "webhook.duplicate"),
        Check(
            "one webhook.received per key",
            received == distinct_keys,
            f"{received} received, {distinct_keys} distinct keys",
        ),
        _surplus(
            "received: no more than in flight", received_since, len(acks.new_ids), acks.in_flight
        ),
        _surplus(
            "duplicates: no more than in flight", duplicates, len(acks.dup_ids), acks.in_flight
        ),
    ]


async def _difference(conn: AsyncConnection, left: str, right: str, columns: list[str]) -> int:
    names = ", ".join(f'"{c}"' for c in columns)
    rows = f'SELECT {names} FROM "{left}" EXCEPT SELECT {names} FROM "{right}"'  # noqa: S608 - own names
    query = f"SELECT count(*) FROM ({rows}) AS d"  # noqa: S608
    return int((await conn.execute(sa.text(query))).scalar_one())


async def _compare(engine: AsyncEngine, live: str, rebuilt: str, columns: list[str]) -> Check:
    async with engine.connect() as conn:
        counts = [
            int((await conn.execute(sa.text(f'SELECT count(*) FROM "{t}"'))).scalar_one())  # noqa: S608
            for t in (live, rebuilt)
        ]
        only_live = await _difference(conn, live, rebuilt, columns)
        only_rebuilt = await _difference(conn, rebuilt, live, columns)
    ok = counts[0] == counts[1] and only_live == 0 and only_rebuilt == 0
    detail = f"{counts[0]} rows live, {counts[1]} rebuilt, {only_live}/{only_rebuilt} differ"
    return Check(f"{live} equals a rebuild", ok, detail)


async def _drop(engine: AsyncEngine, table: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))


async def _behind(engine: AsyncEngine, wait_s: float) -> tuple[int, dict[str, int]]:
    """How far each projection is behind the head, once the live projector had `wait_s` to fold."""
    deadline = time.monotonic() + wait_s
    while True:
        async with engine.connect() as conn:
            head = await read_last_seq(conn)
            positions = await read_checkpoints(conn)
        behind = {name: head - positions.get(name, 0) for name in PROJECTIONS}
        if not any(behind.values()) or time.monotonic() > deadline:
            return head, behind
        await asyncio.sleep(0.05)


async def check_projections(engine: AsyncEngine) -> list[Check]:
    head, behind = await _behind(engine, wait_s=2.0)
    checks = [
        Check("projections at the head", not any(behind.values()), f"head {head}, behind {behind}")
    ]
    for projection in PROJECTIONS.values():
        target = f"bench_check_{projection.name}"
        await rebuild(engine, projection, into=target)
        columns = [c.name for c in projection.shadow_table(target).columns]
        try:
            checks.append(await _compare(engine, projection.table.name, target, columns))
        finally:
            await _drop(engine, target)
    return checks
