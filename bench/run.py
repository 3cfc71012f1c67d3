"""The bench in one command: every suite, each printing ratios against a baseline run beside it.

    python -m bench.run [--smoke] [--pg-url postgresql://postgres@127.0.0.1:5432/test]
                        [--suites http,dedup,rebuild] [--seconds 8]

- http: the bare aiohttp baseline, `hookledger serve` on SQLite (and PostgreSQL with --pg-url),
  deliveries new / duplicate / 20 % duplicate at c=1, 16, 64 (wrk); ends with correctness checks;
- rebuild: rebuild of trigger_executions against a raw scan of the same 1M-event log, and memory;
- dedup: duplicate throughput with that 1M-event log against a 10k one.

Results go to bench/results/ (JSON, and a PNG chart of the HTTP suite). --smoke proves that it
all works in seconds (CI) and judges no target. The exit status is 1 when a correctness check
fails, whatever the speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench import report
from bench.databases import postgres_database, sqlite_url
from bench.dedup import dedup_suite
from bench.load import ensure_wrk
from bench.rebuild import rebuild_suite
from bench.report import server_name
from bench.throughput import (
    CONCURRENCY,
    SCENARIOS,
    Plan,
    Point,
    ServerRun,
    as_json,
    run_baseline,
    run_floor,
    run_hookledger,
)

RESULTS = Path(__file__).resolve().parent / "results"
SUITES = ("http", "rebuild", "dedup")  # rebuild before dedup: dedup appends to the shared log


class _Progress:
    """One line per measured point, numbered, so a long run shows where it is."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def __call__(self, label: str, point: Point | None) -> None:
        if point is None and label.endswith(":"):
            print(f"  {label[:-1]}", flush=True)
            return
        if point is None:
            print(f"  [{self.done + 1:>2}/{self.total}] {label} ...", end="", flush=True)
            return
        self.done += 1
        print(
            f" {point.rps:,.0f} req/s, p50 {point.p50_ms:.2f} ms, p99 {point.p99_ms:.2f} ms, "
            f"RSS {point.rss_mb:.0f} MB" + _lag_text(point) + _checkpoint_text(point),
            flush=True,
        )


def _lag_text(point: Point) -> str:
    if point.lag_max_events is None:
        return ""
    zero = "never" if point.lag_zero_s is None else f"{point.lag_zero_s:.2f} s"
    return f", lag max {point.lag_max_events} events, 0 after {zero}"


def _checkpoint_text(point: Point) -> str:
    if not point.pg_checkpointing:
        return ""
    return f", PostgreSQL checkpointing {point.pg_checkpointing:.0%} of it"


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


async def http_suite(
    args: argparse.Namespace, workdir: Path, stamp: str
) -> tuple[dict[str, Any], bool]:
    wrk = ensure_wrk()
    if wrk is None:
        print("wrk is not available and could not be installed: using bench/pyload.py (slower;")
        print("it takes CPU from the server, so ratios are lower bounds)")
    plan = Plan(
        seconds=1 if args.smoke else args.seconds,
        concurrency=(16,) if args.smoke else CONCURRENCY,
        scenarios=SCENARIOS,
        wrk=wrk,
        workdir=workdir,
        warmup_s=1,
    )
    workers = sorted({int(w) for w in args.workers.split(",")})
    servers = 2 + len(workers) * (1 + bool(args.pg_url))
    progress = _Progress(servers * len(plan.scenarios) * len(plan.concurrency))
    print(
        f"http: {plan.seconds} s per point, load generator {'wrk' if wrk else 'python'}", flush=True
    )
    runs = [await run_baseline(plan, progress), await run_floor(plan, progress)]
    for count in workers:  # each on a database of its own: every run starts from an empty log
        name = server_name("sqlite", count)
        url = sqlite_url(workdir / f"bench-{count}.db")
        runs.append(await run_hookledger(name, url, plan, progress, count))
    if args.pg_url:
        for count in workers:
            async with postgres_database(args.pg_url) as url:
                name = server_name("postgres", count)
                runs.append(await run_hookledger(name, url, plan, progress, count))
    return _http_results(args, runs, stamp, wrk), _all_ok(runs)


def _all_ok(runs: list[ServerRun]) -> bool:
    return all(check.ok for run in runs for check in run.checks)


def _http_results(
    args: argparse.Namespace, runs: list[ServerRun], stamp: str, wrk: str | None
) -> dict[str, Any]:
    print("\n" + report.table(runs))
    for run in runs:
        for check in run.checks:
            print(f"  {'ok  ' if check.ok else 'FAIL'} {run.name}: {check.name} ({check.detail})")
    judged = [] if args.smoke else report.targets(runs)
    if args.smoke:
        print("  smoke mode: targets not judged")
    for statement, met in judged:
        print(f"  {'met ' if met else 'MISS'} {statement}")
    png = report.chart(runs, RESULTS / f"http-{stamp}.png", f"hookledger vs bare aiohttp ({stamp})")
    if png:
        print(f"chart: {png}")
    return {
        "load_generator": "wrk" if wrk else "python",
        "runs": [as_json(run) for run in runs],
        "targets": [{"statement": s, "met": m} for s, m in judged],
        "markdown": report.markdown(runs),
        "chart": str(png) if png else None,
    }


async def _main(args: argparse.Namespace) -> int:
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, Any] = {"stamp": stamp, "smoke": args.smoke, "machine": _machine()}
    ok = True
    with tempfile.TemporaryDirectory(prefix="hookledger-bench-") as tmp:
        workdir = Path(tmp)
        for suite in args.suites:
            print(f"\n== {suite}", flush=True)
            results[suite], suite_ok = await SUITE_RUNNERS[suite](args, workdir, stamp)
            ok = ok and suite_ok
    results["machine"]["load_average_after"] = os.getloadavg()
    path = RESULTS / f"{'smoke' if args.smoke else 'bench'}-{stamp}.json"
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(f"\nresults: {path}")
    print("correctness: all checks passed" if ok else "correctness: A CHECK FAILED")
    return 0 if ok else 1


def _suites(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = set(chosen) - set(SUITES)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown suites {sorted(unknown)}; known: {', '.join(SUITES)}"
        )
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes; no targets")
    parser.add_argument(
        "--pg-url", help="a PostgreSQL server to bench on (a database is made and dropped)"
    )
    parser.add_argument("--suites", type=_suites, default=list(SUITES), help="comma-separated")
    parser.add_argument("--seconds", type=int, default=8, help="per HTTP point (at most 10)")
    parser.add_argument(
        "--big-events", type=int, default=1_000_000, help="the large log (dedup, rebuild)"
    )
    parser.add_argument(
        "--workers",
        default="0,1",
        help="hookledger serve --workers N, for each N (comma-separated): servers sqlite, "
        "sqlite-w1, … (and postgres, postgres-w1, …)",
    )
    parser.add_argument(
        "--rebuild-on-pg", action="store_true", help="also fill and rebuild on --pg-url"
    )
    args = parser.parse_args()
    args.seconds = max(1, min(args.seconds, 10))
    sys.exit(uvloop.run(_main(args)))


SUITE_RUNNERS = {"http": http_suite, "dedup": dedup_suite, "rebuild": rebuild_suite}

if __name__ == "__main__":
    main()
