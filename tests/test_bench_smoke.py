"""The bench runs end to end in smoke mode (issue 6: CI proves it works; it judges no target).

It starts the baseline, the floor (bench/floor.py) and `hookledger serve` on SQLite, drives each
with the load generator, and exits non-zero when a correctness check fails (every acknowledged
delivery in the log once, every projection equal to a rebuild). Speed is measured by `make bench`,
never asserted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args: str) -> str:
    result = subprocess.run(  # noqa: S603 - our own bench modules
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_bench_smoke_runs_and_its_correctness_checks_pass() -> None:
    pytest.importorskip(
        "matplotlib", reason="the bench extra is not installed (make test installs it)"
    )
    output = _bench("bench.run", "--smoke", "--suites", "http")
    assert "correctness: all checks passed" in output, output[-4000:]
    # Each reference answered: a req/s above zero for every scenario of the baseline and floor.
    for server in ("baseline", "floor"):
        for scenario in ("new", "dup", "mix"):
            row = re.search(rf"^{server}\s+{scenario}\s+16\s+([\d,]+)", output, re.MULTILINE)
            answered = int(row.group(1).replace(",", "")) if row else 0
            assert answered > 0, (server, scenario, output[-4000:])


@pytest.mark.slow
def test_the_writer_benchmark_measures_each_batch_size() -> None:
    pytest.importorskip("psutil", reason="the bench extra is not installed (make test installs it)")
    output = _bench("bench.writer", "--batches", "1,8", "--deliveries", "40")
    rows = re.findall(r"^batch +(\d+): +([\d,]+) deliveries, CPU +([\d.]+) us", output, re.M)
    assert [int(batch) for batch, _, _ in rows] == [1, 8], output
    assert all(int(count.replace(",", "")) >= 40 and float(cpu) > 0 for _, count, cpu in rows)


@pytest.mark.slow
def test_the_writer_benchmark_measures_the_ledger_side_of_the_link() -> None:
    pytest.importorskip("psutil", reason="the bench extra is not installed (make test installs it)")
    for extra in ([], ["--duplicates"]):
        output = _bench("bench.writer", "--batches", "8", "--deliveries", "40", "--link", *extra)
        assert "over the ledger link" in output, output
        # 20 batches fed, each once the last was answered; the first commit starts the count.
        row = re.search(r"^batch +8: +([\d,]+) deliveries, CPU +([\d.]+) us", output, re.M)
        assert row and 19 * 8 <= int(row.group(1)) < 20 * 8 and float(row.group(2)) > 0, output


@pytest.mark.slow
def test_the_worker_benchmark_answers_through_the_fast_lane() -> None:
    for extra, status in (([], "202 Accepted"), (["--duplicates"], "200 OK")):
        output = _bench("bench.worker", "--rounds", "3", *extra)
        found = re.search(r"\(HTTP/1.1 ([^)]+)\): CPU ([\d.]+) us a request", output)
        assert found and found.group(1) == status and float(found.group(2)) > 0, output


@pytest.mark.slow
def test_the_probe_measures_a_point_and_the_cpu_of_each_process() -> None:
    pytest.importorskip("psutil", reason="the bench extra is not installed (make test installs it)")
    output = _bench(
        "bench.probe", "sqlite", "--workers", "1", "--seconds", "1", "--connections", "4"
    )
    found = re.search(r"^this: +([\d,]+) req/s .* CPU ([\d.]+) \+ ([\d.]+) ms", output, re.M)
    assert found, output  # the main process and its worker, each with its own CPU a request
    assert int(found.group(1).replace(",", "")) > 0


@pytest.mark.slow
def test_the_wal_reader_names_the_b_trees_each_commit_writes() -> None:
    output = _bench("bench.walpages", "--batch", "8", "--commits", "3", "--warm", "64")
    pages = {name: float(count) for count, name in re.findall(r"^ +([\d.]+)  (\S+)$", output, re.M)}
    # Each commit writes the log's new rows, the executions' rows, and the checkpoints that
    # moved with them: the pages of those B-trees are in every commit's frames.
    assert pages.get("events", 0) >= 2, output  # 8 rows of ~2 KB: at least two 4 KiB pages
    for tree in ("trigger_executions", "projection_checkpoints", "trigger_stats"):
        assert pages.get(tree, 0) >= 1, output
    total = float(re.search(r"^([\d.]+) pages a commit", output, re.M).group(1))  # type: ignore[union-attr]
    assert abs(total - sum(pages.values())) < 0.2, output


@pytest.mark.slow
def test_the_wal_reader_counts_every_commit_past_a_checkpoint() -> None:
    # The writer's checkpointer restarting the WAL past 64 frames, with time to do so between
    # the counted commits: every commit's frames are still counted (as many a commit as in a
    # short run), where a restarted WAL left only the frames since the restart (0.6 a commit
    # when the tool held no read transaction).
    def per_commit(commits: int, *lowered: str) -> float:
        output = _bench(
            "bench.walpages", "--batch", "8", "--commits", str(commits), "--warm", "64", *lowered
        )
        found = re.search(r"^([\d.]+) pages a commit", output, re.M)
        assert found, output
        return float(found.group(1))

    lowered = ("--restart-frames", "64", "--checkpoint-every", "0.002", "--pause", "0.01")
    many, few = per_commit(60, *lowered), per_commit(5)
    assert many * 60 > 4 * 64
    assert 0.7 * few < many < 1.3 * few


_SAMPLER = """
import asyncio, sys
from bench.throughput import sample_checkpointer

async def main():
    seen = []
    sampling = asyncio.create_task(sample_checkpointer(sys.argv[1], seen, every_s=0.002))
    for _ in range(1000):
        await asyncio.sleep(0.01)
        if any(seen):
            break
    sampling.cancel()
    print("sampled", len(seen), "checkpointing", sum(seen), flush=True)

asyncio.run(main())
"""


async def test_the_bench_sees_postgresql_checkpointing(pg_engine: AsyncEngine) -> None:
    """A point on PostgreSQL says how much of it the shared server spent checkpointing (its
    writes compete with each commit's WAL flush): sampled while checkpoints run, it is seen."""
    dsn = pg_engine.url.render_as_string(hide_password=False).replace("+asyncpg", "")
    sampler = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SAMPLER, dsn, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    async with pg_engine.connect() as conn:
        await conn.execute(sa.text("CREATE TABLE dirty (n int, s text)"))
        await conn.commit()
        for _ in range(50):  # pages to write, so that each checkpoint takes a while
            if sampler.returncode is not None:
                break
            fill = "INSERT INTO dirty SELECT g, repeat('x', 500) FROM generate_series(1, 50000) g"
            await conn.execute(sa.text(fill))
            await conn.commit()
            await conn.execute(sa.text("CHECKPOINT"))
            await conn.commit()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(sampler.wait()), 0.05)
    out, _ = await sampler.communicate()
    assert sampler.returncode == 0
    sampled, checkpointing = re.findall(r"\d+", out.decode())
    assert int(sampled) > 0 and int(checkpointing) > 0, out
