"""`hookledger rebuild NAME`: a projection rebuilt from the log, swapped in, or kept aside in a
table of its own (`--into`, `--until-seq`, `--as-of`), which replaces only a table a rebuild made
unless asked (`--replace`). Refusals are `error: …` lines and exit status 1, said before the
database is touched where they can be."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from ledger.codec import parse_time
from ledger.migrate import upgrade
from ledger.store import create_engine, first_seq_at
from projections.base import Projection
from projections.errors import ProjectionError
from projections.rebuild import rebuild
from projections.registry import PROJECTIONS
from projections.targets import check_target
from server.config import Settings
from server.progress import ProgressBar


async def rebuild_command(args: argparse.Namespace) -> None:
    projection = PROJECTIONS.get(args.name)
    if projection is None:
        raise SystemExit(f"error: no projection {args.name!r}; known: {', '.join(PROJECTIONS)}")
    if args.replace and args.into is None and args.until_seq is None and args.as_of is None:
        raise SystemExit(
            "error: --replace goes with --into, --until-seq or --as-of "
            "(a rebuild without them always swaps into the live table)"
        )
    try:
        if args.into is not None:
            check_target(args.into)  # before the schema is touched, too
        as_of = _as_of(args.as_of) if args.as_of is not None else None
        await _rebuild_as_asked(args, projection, as_of)
    except ProjectionError as exc:
        raise SystemExit(f"error: {exc}") from None


def _as_of(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:  # parse_time's, for a time UTC cannot hold too
        raise SystemExit(f"error: --as-of {text!r} is not an ISO-8601 time: {exc}") from None


async def _rebuild_as_asked(
    args: argparse.Namespace, projection: Projection, as_of: datetime | None
) -> None:
    engine = create_engine(Settings.from_env(database_url=args.database_url).database_url)
    try:
        await upgrade(engine)
        until = args.until_seq
        if as_of is not None:
            async with engine.connect() as conn:
                until = await first_seq_at(conn, as_of)
        into = args.into or (f"{projection.name}_at_{until}" if until is not None else None)
        bar = ProgressBar(f"rebuild {projection.name}")
        result = await rebuild(
            engine,
            projection,
            until_seq=until,
            into=into,
            progress=bar.update,
            replace=args.replace,
        )
        bar.close()
        print(
            f"rebuilt {result.name} into {result.table}: {result.events} events up to seq "
            f"{result.until_seq} in {result.seconds:.2f} s"
        )
    finally:
        await engine.dispose()


def _seq(text: str) -> int:
    try:
        seq = int(text)
    except ValueError:
        seq = -1
    if seq < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seq (a whole number, 0 or more)")
    return seq


def add_parser(sub: Any) -> None:
    """The `rebuild` sub-command, on the `hookledger` parser."""
    command = sub.add_parser("rebuild", help="rebuild a projection from the log")
    command.add_argument("name", choices=sorted(PROJECTIONS))
    past = command.add_mutually_exclusive_group()
    past.add_argument("--until-seq", type=_seq, help="the view as it was after this event")
    past.add_argument("--as-of", help="ISO-8601 time: the view as it was then")
    command.add_argument("--into", help="table to build into (default: swap into the live one)")
    command.add_argument(
        "--replace",
        action="store_true",
        help="drop a table of the --into name (or the point-in-time one) that no rebuild made",
    )
