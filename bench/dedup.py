"""Dedup stays O(log n): duplicate throughput against a 1M-event log, beside the same against 10k.

Both logs are filled through the ledger API (bench/fill.py) with keys dup-1 .. dup-N, and the load
generator draws its duplicates from all N keys, so lookups land all over the index. Servers run
one after the other, twice each, alternating, and the median counts.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import aiohttp

from bench import servers
from bench.checks import Acknowledged, check_log
from bench.fill import SMOKE_EVENTS, sqlite_log
from bench.load import TRIGGER_ID, Load, ensure_wrk, run_load
from bench.throughput import Admin, seed
from ledger.store import create_engine, read_last_seq, write_transaction
from projections.registry import PROJECTIONS
from projections.runner import set_checkpoint

CONNECTIONS = 64
TARGET = 0.8  # issue 6: throughput at 1M >= 0.8x throughput at 10k


async def _skip_projections(url: str) -> int:
    """Start the projections at the head: this suite measures the appender's lookup, and folding
    1M events first would only compete with it (the HTTP suite checks projections). The head."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            head = await read_last_seq(conn)
        async with write_transaction(engine) as conn:
            for name in PROJECTIONS:
                await set_checkpoint(conn, name, head)
    finally:
        await engine.dispose()
    return head


async def _measure(
    url: str, keys: int, label: str, seconds: int, workdir: Path
) -> tuple[float, bool]:
    wrk, head = ensure_wrk(), await _skip_projections(url)
    async with (
        servers.hookledger(f"dedup-{label}", url, workdir) as server,
        aiohttp.ClientSession() as session,
    ):
        admin = Admin(session, server)
        await admin.create_trigger()
        # Waits out the receiver's "no such trigger" cache; dup-1 is in the log: a duplicate.
        seeded_new, seeded_dup = await seed(admin, 1)
        load = Load("dup", CONNECTIONS, seconds, f"dedup-{label}", keys)
        result = await run_load(wrk, server.url, load, workdir / f"dedup-{label}.json")
    engine = create_engine(url)
    try:
        acks = Acknowledged(seeded_new + result.new_ids, seeded_dup + result.dup_ids, CONNECTIONS)
        checks = await check_log(engine, TRIGGER_ID, acks, after_seq=head)
    finally:
        await engine.dispose()
    failed = [c for c in checks if not c.ok]
    for check in failed:
        print(f"  FAIL {label}: {check.name} ({check.detail})")
    print(f"  {label}: {result.rps:,.0f} duplicates/s (p99 {result.p99_ms:.1f} ms)", flush=True)
    return result.rps, not failed and result.others == 0


async def dedup_suite(
    args: argparse.Namespace, workdir: Path, stamp: str
) -> tuple[dict[str, Any], bool]:
    sizes = (1_000, SMOKE_EVENTS) if args.smoke else (10_000, args.big_events)
    seconds = 1 if args.smoke else args.seconds
    logs = {size: await sqlite_log(workdir, size) for size in sizes}
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    ok = True
    for _round in range(1 if args.smoke else 2):
        for size, (url, keys) in logs.items():
            rps, fine = await _measure(url, keys, f"{size:,}", seconds, workdir)
            rates[size].append(rps)
            ok = ok and fine
    small, large = (statistics.median(rates[s]) for s in sizes)
    ratio = large / small if small else 0.0
    verdict = "smoke: not judged" if args.smoke else ("met" if ratio >= TARGET else "MISS")
    print(
        f"  duplicates/s with {sizes[1]:,} events: {ratio:.2f}x that with {sizes[0]:,} "
        f"({verdict}; target >= {TARGET})"
    )
    return {
        "connections": CONNECTIONS,
        "seconds": seconds,
        "rates": {str(s): r for s, r in rates.items()},
        "ratio": round(ratio, 3),
        "met": None if args.smoke else ratio >= TARGET,
    }, ok
