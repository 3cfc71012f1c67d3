"""The load generator: wrk with bench/lua/deliveries.lua, or bench/pyload.py where wrk is missing.

Both write the same JSON (counts, latency percentiles, the event ids of 202 and 200 answers), so
the rest of the bench cannot tell them apart.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
LUA = HERE / "lua" / "deliveries.lua"
PAYLOAD = HERE / "payload.json"
TRIGGER_ID = "bench"
DUP_PERCENT = 20  # the mix scenario


@dataclass(frozen=True, slots=True)
class Load:
    """What one run of the load generator asks: a scenario at a concurrency, for some seconds."""

    scenario: str  # new | dup | mix
    connections: int
    seconds: int  # wrk takes whole seconds
    prefix: str  # new keys are PREFIX-thread-counter: unique across the bench run
    dup_keys: int = 256  # duplicates draw from dup-1 .. dup-N
    payload: Path = PAYLOAD  # the body of every request


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    new_ids: list[str]
    dup_ids: list[str]
    others: int
    errors: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def ensure_wrk() -> str | None:
    """wrk's path, installing the Debian package when it is missing and apt can; None: fall back."""
    found = shutil.which("wrk")
    if found or not shutil.which("apt-get"):
        return found
    print("wrk is missing: apt-get install -y wrk ...", flush=True)
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        if (
            subprocess.run(step, capture_output=True, check=False).returncode != 0
            and step[1] != "update"
        ):
            return None
    return shutil.which("wrk")


def _wrk_command(wrk: str, url: str, load: Load) -> list[str]:
    threads = min(2, load.connections)
    return [
        wrk, f"-t{threads}", f"-c{load.connections}", f"-d{load.seconds}s", "--timeout", "10s",
        "-s", str(LUA), f"{url}/webhooks/{TRIGGER_ID}", "--",
        load.scenario, load.prefix, str(load.dup_keys), str(DUP_PERCENT),
    ]  # fmt: skip


def _python_command(url: str, load: Load) -> list[str]:
    return [
        sys.executable, "-m", "bench.pyload", f"{url}/webhooks/{TRIGGER_ID}",
        load.scenario, load.prefix, str(load.dup_keys), str(DUP_PERCENT),
        "--connections", str(load.connections), "--seconds", str(load.seconds),
    ]  # fmt: skip


async def run_load(wrk: str | None, url: str, load: Load, out: Path) -> LoadResult:
    command = _wrk_command(wrk, url, load) if wrk else _python_command(url, load)
    # What ran before is on the disk first (the earlier servers' files and logs, a filled log):
    # the kernel writes dirty pages back ~30 s after they were made, and that writeback held a
    # PostgreSQL commit's sync for 100-160 ms, so a point paid for the runs before it; the
    # servers run one after the other, PostgreSQL's last (bench/README.md, session 24).
    await asyncio.to_thread(os.sync)
    env = {"BENCH_PAYLOAD": str(load.payload), "BENCH_WRK_OUT": str(out)}
    process = await asyncio.create_subprocess_exec(
        *command,
        env=os.environ | env,
        cwd=HERE.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    if process.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"load generator failed ({process.returncode}): {output.decode()[-2000:]}"
        )
    return _result(orjson.loads(out.read_bytes()))


def _result(raw: dict[str, Any]) -> LoadResult:
    threads = raw["threads"]
    return LoadResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1e3,
        p99_ms=raw["p99_us"] / 1e3,
        max_ms=raw["max_us"] / 1e3,
        new_ids=[i for t in threads for i in t["new_ids"]],
        dup_ids=[i for t in threads for i in t["dup_ids"]],
        others=sum(t["others"] for t in threads),
        errors=raw["errors"],
    )
