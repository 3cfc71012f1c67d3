"""A load generator in Python, for machines without wrk: the same requests and the same JSON out.

It is slower than wrk and takes more of the CPU the server needs, so its ratios are lower bounds.

    BENCH_PAYLOAD=bench/payload.json BENCH_WRK_OUT=out.json \
        python -m bench.pyload URL MODE PREFIX KEYS PCT --connections 16 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import uvloop


@dataclass
class _Worker:
    number: int
    new_ids: list[str] = field(default_factory=list)
    dup_ids: list[str] = field(default_factory=list)
    others: int = 0
    latencies: list[float] = field(default_factory=list)
    counter: int = 0


def _key(args: argparse.Namespace, worker: _Worker) -> str:
    worker.counter += 1
    is_dup = args.mode == "dup" or (args.mode == "mix" and random.randint(1, 100) <= args.pct)
    if is_dup:
        return f"dup-{random.randint(1, args.keys)}"
    return f"{args.prefix}-{worker.number}-{worker.counter}"


async def _drive(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    worker: _Worker,
    payload: bytes,
    end: float,
) -> None:
    while time.monotonic() < end:
        headers = {"Content-Type": "application/json", "Idempotency-Key": _key(args, worker)}
        started = time.perf_counter()
        async with session.post(args.url, data=payload, headers=headers) as response:
            body = await response.read()
        worker.latencies.append(time.perf_counter() - started)
        if response.status in (200, 202):
            ids = worker.new_ids if response.status == 202 else worker.dup_ids
            ids.append(orjson.loads(body).get("event_id", "?"))
        else:
            worker.others += 1


def _percentile(sorted_values: list[float], pct: float) -> int:
    if not sorted_values:
        return 0
    index = min(len(sorted_values) - 1, int(len(sorted_values) * pct / 100))
    return int(sorted_values[index] * 1e6)


async def _run(args: argparse.Namespace) -> dict[str, object]:
    payload = Path(os.environ["BENCH_PAYLOAD"]).read_bytes()
    workers = [_Worker(n) for n in range(1, args.connections + 1)]
    connector = aiohttp.TCPConnector(limit=args.connections)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as session:
        end = started + args.seconds
        await asyncio.gather(*(_drive(session, args, w, payload, end) for w in workers))
    elapsed = time.monotonic() - started
    latencies = sorted(x for w in workers for x in w.latencies)
    threads = [{"new_ids": w.new_ids, "dup_ids": w.dup_ids, "others": w.others} for w in workers]
    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "p50_us": _percentile(latencies, 50),
        "p99_us": _percentile(latencies, 99),
        "max_us": int(latencies[-1] * 1e6) if latencies else 0,
        "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0},
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("mode", choices=["new", "dup", "mix"])
    parser.add_argument("prefix")
    parser.add_argument("keys", type=int)
    parser.add_argument("pct", type=int)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    result = uvloop.run(_run(args))
    Path(os.environ["BENCH_WRK_OUT"]).write_bytes(orjson.dumps(result))


if __name__ == "__main__":
    main()
