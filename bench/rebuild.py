"""Rebuild of trigger_executions against the raw scan-and-decode rate of the same log; memory.

Each pass runs in a process of its own (bench/rebuild_child.py), so its peak RSS is its own:
a raw scan (driver + orjson, the ceiling), then rebuilds of the first 100k events and of all 1M.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from bench.databases import postgres_database
from bench.fill import SMOKE_EVENTS, fill_log, sqlite_log
from ledger.migrate import upgrade
from ledger.store import create_engine

RATE_TARGET = 0.5  # rebuild >= 0.5x the raw scan of the same log
RSS_TARGET = 1.3  # peak RSS rebuilding 1M <= 1.3x that rebuilding 100k


async def _child(mode: str, url: str, until: int | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.rebuild_child", mode, url]
    if until:
        command += ["--until", str(until)]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with {process.returncode}")
    result: dict[str, Any] = orjson.loads(output.splitlines()[-1])
    label = f"{mode} {result['events']:,} events"
    print(
        f"  {label:<24} {result['events_per_s']:>9,}/s  peak RSS {result['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return result


async def _measure(url: str, small: int, smoke: bool) -> dict[str, Any]:
    scan = await _child("scan", url)
    part = await _child("rebuild", url, small)
    full = await _child("rebuild", url)
    rate = full["events_per_s"] / scan["events_per_s"]
    rss = full["peak_rss_mb"] / part["peak_rss_mb"]
    for statement, ratio, target, met in (
        ("rebuild rate / raw scan rate", rate, RATE_TARGET, rate >= RATE_TARGET),
        (
            f"peak RSS {full['events']:,} / {part['events']:,} events",
            rss,
            RSS_TARGET,
            rss <= RSS_TARGET,
        ),
    ):
        verdict = "smoke: not judged" if smoke else ("met" if met else "MISS")
        print(
            f"  {statement}: {ratio:.2f} "
            f"({verdict}; target {'>=' if target < 1 else '<='} {target})"
        )
    return {
        "scan": scan,
        "rebuild_small": part,
        "rebuild_full": full,
        "rate_ratio": round(rate, 3),
        "rss_ratio": round(rss, 3),
    }


async def _postgres(args: argparse.Namespace, events: int, small: int) -> dict[str, Any]:
    async with postgres_database(args.pg_url, "rebuild") as url:
        engine = create_engine(url)
        try:
            await upgrade(engine)
            await fill_log(engine, events)
        finally:
            await engine.dispose()
        return await _measure(url, small, args.smoke)


async def rebuild_suite(
    args: argparse.Namespace, workdir: Path, stamp: str
) -> tuple[dict[str, Any], bool]:
    events = SMOKE_EVENTS if args.smoke else args.big_events
    small = events // 10
    url, _keys = await sqlite_log(workdir, events)
    print(f"  SQLite, {events:,} events", flush=True)
    results = {"sqlite": await _measure(url, small, args.smoke)}
    if args.pg_url and args.rebuild_on_pg:
        print(f"  PostgreSQL, {events:,} events", flush=True)
        results["postgres"] = await _postgres(args, events, small)
    return results, True
