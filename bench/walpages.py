"""Which pages each append commit writes to SQLite's WAL, by B-tree (table or index).

A commit's cost on SQLite is mostly its WAL: every page it changed, written whole, then synced.
This appends batches of deliveries through the appender (projections folded in), with the WAL
neither checkpointed nor reset meanwhile, then reads the frames' page numbers from the WAL's own
headers and names each page's B-tree with SQLite's `dbstat` table.

    python -m bench.walpages                 # 20 commits of 32 deliveries, after 1,600 more
    python -m bench.walpages --batch 64 --commits 10
    python -m bench.walpages --restart-frames 64 --checkpoint-every 0.002 --pause 0.01

The last lowers the writer's checkpointer's settings (`ledger/writers.py`) and leaves it time
between commits, so that but for the read transaction this tool holds the WAL would start over
during the counted commits: the smoke test's way to show the counts survive a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sqlite3
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.databases import sqlite_url
from bench.load import PAYLOAD
from bench.writer import delivery, folding_appender
from ledger import writers

_WAL_HEADER = 32
_FRAME_HEADER = 24


@dataclass(frozen=True, slots=True)
class Pages:
    commits: int
    batch: int
    by_tree: dict[str, float]  # B-tree name -> pages written a commit

    @property
    def per_commit(self) -> float:
        return sum(self.by_tree.values())


def frames(wal: bytes) -> list[int]:
    """The page number of each frame of a WAL file, in order."""
    if len(wal) < _WAL_HEADER:
        return []
    (page_size,) = struct.unpack(">I", wal[8:12])
    pages, offset = [], _WAL_HEADER
    while offset + _FRAME_HEADER + page_size <= len(wal):
        (page,) = struct.unpack(">I", wal[offset : offset + 4])
        pages.append(page)
        offset += _FRAME_HEADER + page_size
    return pages


async def _empty_wal(reader: sqlite3.Connection, within_s: float = 30.0) -> None:
    """The WAL emptied before the counted commits. The writer's checkpointer may be running a
    checkpoint of its own, and then this one answers busy at once (no busy handler for that):
    tried again until it is done. One that failed unseen would count every frame before (a CI
    run read 381.8 pages a commit for 28)."""
    deadline = time.monotonic() + within_s
    while reader.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
        if time.monotonic() > deadline:
            raise RuntimeError("the WAL could not be emptied before the counted commits")
        await asyncio.sleep(0.001)


async def measure(path: Path, batch: int, commits: int, warm: int, pause: float = 0.0) -> Pages:
    body = PAYLOAD.read_text()
    async with folding_appender(sqlite_url(path)) as appender:

        async def commit(label: str) -> None:
            await asyncio.gather(
                *(appender.enqueue(delivery(f"{label}-{n}", body)) for n in range(batch))
            )

        for round_ in range(warm // batch):  # the B-trees grow past their first pages
            await commit(f"warm{round_}")
        reader = sqlite3.connect(path, isolation_level=None, timeout=30)
        await _empty_wal(reader)
        # A read transaction on the empty WAL: the writer's checkpointer (ledger/writers.py
        # `WalCheckpointer`) restarts the WAL past its frame limit, over the frames to be
        # counted; a reader whose snapshot precedes them keeps every one in place.
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        for round_ in range(commits):
            await commit(f"probe{round_}")
            await asyncio.sleep(pause)
        reader.execute("COMMIT")
        pages = frames(Path(f"{path}-wal").read_bytes())
        owner = {page: name for name, page in reader.execute("SELECT name, pageno FROM dbstat")}
        reader.close()
    counted = collections.Counter(owner.get(page, "(free or new)") for page in pages)
    by_tree = {name: count / commits for name, count in counted.most_common()}
    return Pages(commits, batch, by_tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="deliveries a commit")
    parser.add_argument("--commits", type=int, default=20)
    parser.add_argument("--warm", type=int, default=1600, help="deliveries appended first")
    parser.add_argument(
        "--restart-frames",
        type=int,
        default=writers.RESTART_FRAMES,
        help="the WAL's length past which the writer's checkpointer restarts it",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=writers.CHECKPOINT_EVERY_S,
        help="seconds between the writer's checkpoints",
    )
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between commits")
    args = parser.parse_args()
    writers.RESTART_FRAMES = args.restart_frames
    writers.CHECKPOINT_EVERY_S = args.checkpoint_every
    with tempfile.TemporaryDirectory(prefix="hookledger-wal-") as tmp:
        pages = asyncio.run(
            measure(Path(tmp) / "wal.db", args.batch, args.commits, args.warm, args.pause)
        )
    print(
        f"{pages.per_commit:.1f} pages a commit of {pages.batch} deliveries "
        f"({pages.per_commit / pages.batch:.2f} a delivery), {pages.commits} commits:"
    )
    for name, count in pages.by_tree.items():
        print(f"  {count:6.1f}  {name}")


if __name__ == "__main__":
    main()
