"""One measured pass over a log, in a process of its own so that its peak RSS is its own.

    python -m bench.rebuild_child scan URL [--until SEQ]     raw driver read + orjson decode
    python -m bench.rebuild_child rebuild URL [--until SEQ]  rebuild trigger_executions aside

Prints one JSON line: events, seconds, events_per_s, peak_rss_mb.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from typing import Any

import asyncpg
import orjson
import sqlalchemy as sa
import uvloop

from ledger.store import create_engine, normalise_url
from projections.rebuild import rebuild
from projections.registry import PROJECTIONS

SCAN_BATCH = 5000
COLUMNS = (
    "seq, id, stream, version, type, trigger_id, idempotency_key, data, meta, recorded_at, hash"
)
REBUILD_TABLE = "bench_rebuild"


def _scan_sqlite(path: str, until: int) -> int:
    conn = sqlite3.connect(path)
    try:
        cursor = conn.execute(f"SELECT {COLUMNS} FROM events WHERE seq <= ? ORDER BY seq", (until,))  # noqa: S608
        done = 0
        while rows := cursor.fetchmany(SCAN_BATCH):
            for row in rows:
                orjson.loads(row[7])
                orjson.loads(row[8])
            done += len(rows)
        return done
    finally:
        conn.close()


async def _scan_postgres(url: str, until: int) -> int:
    conn = await asyncpg.connect(url)
    try:
        done = 0
        async with conn.transaction():
            query = f"SELECT {COLUMNS} FROM events WHERE seq <= $1 ORDER BY seq"  # noqa: S608
            cursor = await conn.cursor(query, until)
            while rows := await cursor.fetch(SCAN_BATCH):
                for row in rows:
                    orjson.loads(row[7])
                    orjson.loads(row[8])
                done += len(rows)
        return done
    finally:
        await conn.close()


async def _scan(url: str, until: int) -> int:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        return _scan_sqlite(url.split("///", 1)[1], until)
    return await _scan_postgres(url.replace("postgresql+asyncpg://", "postgresql://"), until)


async def _rebuild(url: str, until: int) -> tuple[int, float]:
    """The rebuild's events and its own seconds: the table is dropped after the clock stops."""
    engine = create_engine(url)
    try:
        started = time.perf_counter()
        result = await rebuild(
            engine, PROJECTIONS["trigger_executions"], until_seq=until, into=REBUILD_TABLE
        )
        seconds = time.perf_counter() - started
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP TABLE IF EXISTS "{REBUILD_TABLE}"'))
        return result.events, seconds
    finally:
        await engine.dispose()


def _peak_rss_kb() -> int:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the parent.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    until = args.until or 2**62
    if args.mode == "scan":
        started = time.perf_counter()
        events = await _scan(args.url, until)
        seconds = time.perf_counter() - started
    else:
        events, seconds = await _rebuild(args.url, until)
    return {
        "mode": args.mode,
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds) if seconds else 0,
        "peak_rss_mb": round(_peak_rss_kb() / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["scan", "rebuild"])
    parser.add_argument("url")
    parser.add_argument("--until", type=int)
    args = parser.parse_args()
    sys.stdout.write(orjson.dumps(uvloop.run(_main(args))).decode() + "\n")


if __name__ == "__main__":
    main()
