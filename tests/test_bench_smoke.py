"""The bench runs end to end in smoke mode (issue 6: CI proves it works; it judges no target).

It starts the baseline, the floor (bench/floor.py) and `hookledger serve` on SQLite, drives each
with the load generator, and exits non-zero when a correctness check fails (every acknowledged
delivery in the log once, every projection equal to a rebuild). Speed is measured by `make bench`,
never asserted here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke_runs_and_its_correctness_checks_pass() -> None:
    pytest.importorskip(
        "matplotlib", reason="the bench extra is not installed (make test installs it)"
    )
    result = subprocess.run(  # noqa: S603 - our own bench module
        [sys.executable, "-m", "bench.run", "--smoke", "--suites", "http"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "correctness: all checks passed" in output, output[-4000:]
    # Each reference answered: a req/s above zero for every scenario of the baseline and floor.
    for server in ("baseline", "floor"):
        for scenario in ("new", "dup", "mix"):
            row = re.search(rf"^{server}\s+{scenario}\s+16\s+([\d,]+)", output, re.MULTILINE)
            answered = int(row.group(1).replace(",", "")) if row else 0
            assert answered > 0, (server, scenario, output[-4000:])
