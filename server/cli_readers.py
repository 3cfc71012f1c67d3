"""The readers' commands of `hookledger`: events, stats, verify, export.

They read the database directly (no server needed); progress goes to stderr, data to stdout or
the file given, so the output can be piped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.chain import verify_chain
from ledger.migrate import upgrade
from ledger.schema import events
from ledger.store import create_engine
from projections.registry import PROJECTIONS
from projections.runner import ProjectionRunner
from server.audit import checkpoint_of
from server.config import Settings
from server.export import EXPORTS, FORMATS, export
from server.feed import POLL_S, event_filters, follow_events
from server.progress import ProgressBar
from server.queries import event_json
from server.stats import COUNTS, MAX_DAYS, read_stats

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, None]]


@contextlib.asynccontextmanager
async def _engine(args: argparse.Namespace) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings.from_env(database_url=args.database_url).database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _require_log(engine: AsyncEngine) -> None:
    """Readers do not migrate (a read-only role may run them): a database that no hookledger has
    set up yet is said so, not shown as a traceback."""
    async with engine.connect() as conn:
        if not await conn.run_sync(lambda sync: sa.inspect(sync).has_table(events.name)):
            raise SystemExit(
                "error: no hookledger log in this database yet "
                "(`hookledger db upgrade` or `hookledger serve` creates it)"
            )


async def events_command(args: argparse.Namespace) -> None:
    """The log as JSON lines (the shape of GET /api/events items); --follow keeps tailing it."""
    filters = event_filters(args.type or [], args.trigger)
    async with _engine(args) as engine:
        await _require_log(engine)
        batches = follow_events(
            engine,
            after=args.after,
            wait=lambda: asyncio.sleep(POLL_S),
            follow=args.follow,
            **filters,
        )
        async for batch in batches:
            lines = [orjson.dumps(event_json(e)) for e in batch]
            sys.stdout.write(b"\n".join(lines).decode() + "\n")
            sys.stdout.flush()


def _stats_table(result: dict[str, Any]) -> str:
    names = ["trigger_id", "day", *COUNTS, "latency_p50_ms", "latency_p95_ms", "latency_p99_ms"]
    rows = [[str(row[n]) if row[n] is not None else "-" for n in names] for row in result["stats"]]
    for trigger_id, total in result["totals"].items():
        rows.append(
            [trigger_id, "total"]
            + [str(total[n]) if total.get(n) is not None else "-" for n in names[2:]]
        )
    widths = [
        max(len(n), *(len(r[i]) for r in rows)) if rows else len(n) for i, n in enumerate(names)
    ]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


async def stats_command(args: argparse.Namespace) -> None:
    """Per trigger and day; the projector is caught up first, so the numbers are current."""
    if not 1 <= args.days <= MAX_DAYS:
        raise SystemExit(f"error: --days must be between 1 and {MAX_DAYS}")
    async with _engine(args) as engine:
        await upgrade(engine)
        await ProjectionRunner(engine, list(PROJECTIONS.values())).catch_up()
        async with engine.connect() as conn:
            result = await read_stats(conn, days=args.days, trigger_id=args.trigger)
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(_stats_table(result))


async def verify_command(args: argparse.Namespace) -> None:
    """Recompute the hash chain; exit status 1 when it is broken."""
    try:
        start = checkpoint_of(args.from_seq, args.from_hash)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    bar = ProgressBar("verify")
    async with _engine(args) as engine:
        await _require_log(engine)
        result = await verify_chain(engine, start=start, progress=bar.update)
    bar.close()
    if args.json:
        sys.stdout.write(orjson.dumps(result.to_json()).decode() + "\n")
    elif result.first_bad is None:
        print(f"ok: {result.checked} events verified after seq {start.seq}")
        last = result.last_good
        print(f"checkpoint to keep: --from-seq {last.seq} --from-hash {last.hash}")
    else:
        bad = result.first_bad
        print(f"BROKEN at seq {bad.seq} ({bad.reason}): {bad.message}")
        print(f"{result.checked} events verified before it")
    if not result.ok:
        raise SystemExit(1)


@contextlib.contextmanager
def _output(path: str | None) -> Any:
    if path is None or path == "-":
        yield sys.stdout
        return
    target = Path(path)
    if target.exists() and not target.is_file():  # /dev/stdout, a FIFO: written as they are
        with target.open("w", encoding="utf-8", newline="") as handle:
            yield handle
        return
    # Written beside it and renamed once whole: an export that fails or is interrupted leaves
    # the file that was there (an earlier export, say) as it was, never emptied or half new.
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with partial.open("w", encoding="utf-8", newline="") as handle:
            yield handle
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


async def export_command(args: argparse.Namespace) -> None:
    bar = ProgressBar(f"export {args.name}", unit="rows")
    out: TextIO
    with _output(args.output) as out:
        async with _engine(args) as engine:
            try:
                count = await export(
                    engine,
                    args.name,
                    out,
                    fmt=args.format,
                    after=args.after,
                    table=args.table,
                    progress=bar.update,
                )
            except ValueError as exc:
                raise SystemExit(f"error: {exc}") from None
        out.flush()
    bar.close()
    sys.stderr.write(f"exported {count} rows of {args.name}\n")


def add_parsers(sub: Any) -> None:
    """The readers' sub-commands, on the `hookledger` parser (`events` is defined there)."""
    stats = sub.add_parser("stats", help="per trigger and UTC day: counts and dispatch latency")
    stats.add_argument("--days", type=int, default=7, help="today and the days before (default 7)")
    stats.add_argument("--trigger")
    stats.add_argument("--json", action="store_true", help="the JSON of GET /api/stats")
    verify = sub.add_parser("verify", help="recompute the hash chain; name the first break")
    verify.add_argument(
        "--from-seq", type=int, help="a checkpoint: seq of an event verified before"
    )
    verify.add_argument("--from-hash", help="a checkpoint: the hash that event had")
    verify.add_argument("--json", action="store_true")
    exp = sub.add_parser("export", help="stream the log or a projection as JSON lines or CSV")
    exp.add_argument("name", choices=sorted(EXPORTS))
    exp.add_argument("--format", choices=FORMATS, default="jsonl")
    exp.add_argument(
        "--after", type=int, default=0, help="events with seq > N, rows with last_seq > N"
    )
    exp.add_argument("--output", "-o", help="file to write (default: stdout)")
    exp.add_argument(
        "--table", help="a point-in-time table of that projection (from rebuild --into)"
    )


COMMANDS: dict[str, Command] = {
    "events": events_command,
    "stats": stats_command,
    "verify": verify_command,
    "export": export_command,
}
