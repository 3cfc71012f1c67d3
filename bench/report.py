"""Tables, targets and chart of one HTTP suite run, every ratio against that run's baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.throughput import Point, ServerRun

# Issue 6: SQLite (synchronous=FULL) and PostgreSQL at c=64, as ratios to the baseline.
TARGET_CONNECTIONS = 64
TARGETS = {("sqlite", "new"): 0.5, ("sqlite", "dup"): 0.6, ("postgres", "new"): 0.5}
P99_FACTOR = 3.0
RSS_LIMIT_MB = 200.0
LAG_LIMIT_S = 2.0
# Servers measured beside hookledger for reference (bench/baseline.py, bench/floor.py).
REFERENCES = ("baseline", "floor")


def server_name(kind: str, workers: int) -> str:
    """`sqlite`, `sqlite-w1` (serve --workers 1), …: the targets apply to each."""
    return kind if workers == 0 else f"{kind}-w{workers}"


def server_kind(name: str) -> str:
    return name.split("-w", 1)[0]


def _baseline(runs: list[ServerRun], point: Point) -> Point | None:
    for run in runs:
        if run.name == "baseline":
            for p in run.points:
                if (p.scenario, p.connections) == (point.scenario, point.connections):
                    return p
    return None


def ratio(runs: list[ServerRun], point: Point) -> float | None:
    base = _baseline(runs, point)
    return point.rps / base.rps if base and base.rps else None


def p99_ratio(runs: list[ServerRun], point: Point) -> float | None:
    base = _baseline(runs, point)
    return point.p99_ms / base.p99_ms if base and base.p99_ms else None


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def table(runs: list[ServerRun]) -> str:
    head = (
        f"{'server':<9} {'scenario':<8} {'c':>3} {'req/s':>8} {'x base':>6} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'p99 x':>6} {'RSS MB':>6} {'lag max':>7} {'lag->0 s':>8}"
    )
    lines = [head, "-" * len(head)]
    for run in runs:
        for p in run.points:
            lines.append(
                f"{p.server:<11} {p.scenario:<8} {p.connections:>3} {p.rps:>8,.0f} "
                f"{_num(ratio(runs, p)):>6} {p.p50_ms:>7.2f} {p.p99_ms:>7.2f} "
                f"{_num(p99_ratio(runs, p)):>6} {p.rss_mb:>6.0f} "
                f"{_num(p.lag_max_events, '{:,}'):>7} {_num(p.lag_zero_s):>8}"
            )
    return "\n".join(lines)


def markdown(runs: list[ServerRun]) -> str:
    """The same table for bench/README.md."""
    lines = [
        "| server | scenario | c | req/s | × base | p50 ms | p99 ms | p99 × base | RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        for p in run.points:
            lines.append(
                f"| {p.server} | {p.scenario} | {p.connections} | {p.rps:,.0f} | "
                f"{_num(ratio(runs, p))} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | "
                f"{_num(p99_ratio(runs, p))} | {p.rss_mb:.0f} |"
            )
    return "\n".join(lines)


def _target_lines(runs: list[ServerRun], point: Point) -> list[tuple[str, bool]]:
    found = []
    kind = server_kind(point.server)
    goal = TARGETS.get((kind, point.scenario))
    r = ratio(runs, point)
    if goal is not None and r is not None:
        found.append(
            (f"{point.server} {point.scenario} c=64: {r:.2f}x baseline (>= {goal})", r >= goal)
        )
    p99 = p99_ratio(runs, point)
    if kind == "sqlite" and p99 is not None:
        found.append(
            (
                f"{point.server} {point.scenario} c=64: p99 {p99:.1f}x baseline's "
                f"(<= {P99_FACTOR})",
                p99 <= P99_FACTOR,
            )
        )
    return found


def _lag_lines(point: Point) -> list[tuple[str, bool]]:
    if point.lag_max_events is None:
        return []
    behind_s = point.lag_max_events / point.rps if point.rps else 0.0
    zero = point.lag_zero_s
    label = f"{point.server} {point.scenario} c={point.connections}"
    return [
        (
            f"{label}: projector lag <= {behind_s:.2f} s during the run (< {LAG_LIMIT_S})",
            behind_s < LAG_LIMIT_S,
        ),
        (
            f"{label}: lag 0 after {_num(zero)} s (<= {LAG_LIMIT_S})",
            zero is not None and zero <= LAG_LIMIT_S,
        ),
    ]


def targets(runs: list[ServerRun]) -> list[tuple[str, bool]]:
    """(statement, met) for every target issue 6 sets."""
    found: list[tuple[str, bool]] = []
    for run in runs:
        for point in run.points:
            if point.connections == TARGET_CONNECTIONS:
                found += _target_lines(runs, point)
            found += [line for line in _lag_lines(point) if not line[1]]
        if run.name not in REFERENCES:
            found.append(
                (
                    f"{run.name}: peak RSS {run.peak_rss_mb:.0f} MB (<= {RSS_LIMIT_MB:.0f})",
                    run.peak_rss_mb <= RSS_LIMIT_MB,
                )
            )
    return found


def chart(runs: list[ServerRun], path: Path, title: str) -> Path | None:
    """Throughput against concurrency, one panel per scenario, one line per server."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'): no chart")
        return None
    scenarios = list(dict.fromkeys(p.scenario for run in runs for p in run.points))
    figure, axes = plt.subplots(1, len(scenarios), figsize=(4.5 * len(scenarios), 4), squeeze=False)
    for axis, scenario in zip(axes[0], scenarios, strict=True):
        _panel(axis, runs, scenario)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _panel(axis: Any, runs: list[ServerRun], scenario: str) -> None:
    for run in runs:
        points = sorted(
            (p for p in run.points if p.scenario == scenario), key=lambda p: p.connections
        )
        xs = [p.connections for p in points]
        axis.plot(xs, [p.rps for p in points], marker="o", label=run.name)
    axis.set_xscale("log", base=2)
    axis.set_xticks(sorted({p.connections for run in runs for p in run.points}))
    axis.get_xaxis().set_major_formatter("{x:.0f}")
    axis.set_xlabel("concurrent connections")
    axis.set_ylabel("requests/s")
    axis.set_title(scenario)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend()
