"""The HTTP suite: each server under the same load, scenario by scenario and concurrency by
concurrency, with its memory and its projector's lag watched, and checked at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench import servers
from bench.checks import Acknowledged, Check, check_log, check_projections
from bench.databases import postgres_dsn
from bench.load import PAYLOAD, TRIGGER_ID, Load, LoadResult, run_load
from ledger.store import create_engine

SCENARIOS = ("new", "dup", "mix")
CONCURRENCY = (1, 16, 64)
DUP_KEYS = 256
LAG_ZERO_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Plan:
    seconds: int
    concurrency: tuple[int, ...]
    scenarios: tuple[str, ...]
    wrk: str | None
    workdir: Path
    warmup_s: int = 1


@dataclass(slots=True)
class Point:
    server: str
    scenario: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    rss_mb: float
    requests: int
    new: int
    dup: int
    others: int
    errors: dict[str, int]
    lag_max_events: int | None = None
    lag_zero_s: float | None = None
    # PostgreSQL: the share of the point's samples in which the server was checkpointing (its
    # writes compete with each commit's WAL flush: a tail there is the shared server's).
    pg_checkpointing: float | None = None


@dataclass(slots=True)
class ServerRun:
    name: str
    points: list[Point] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    checks: list[Check] = field(default_factory=list)


Progress = Callable[[str, Point | None], None]
_MB = 1024 * 1024


class Admin:
    """The admin API of one hookledger server."""

    def __init__(self, session: aiohttp.ClientSession, server: servers.Server) -> None:
        self._session = session
        self._url = server.url
        self._headers = {"Authorization": f"Bearer {servers.ADMIN_TOKEN}"}

    async def create_trigger(self) -> None:
        body = {"id": TRIGGER_ID, "source": "generic"}
        async with self._session.post(
            f"{self._url}/api/triggers", json=body, headers=self._headers
        ) as response:
            if response.status not in (201, 409):  # 409: there already (a reused log)
                raise RuntimeError(
                    f"creating the trigger: {response.status} {await response.text()}"
                )

    async def lag(self) -> int:
        async with self._session.get(
            f"{self._url}/api/projections", headers=self._headers
        ) as response:
            body = await response.json()
        return int(max(p["lag_events"] for p in body["projections"]))

    async def deliver(self, key: str) -> tuple[int, str]:
        headers = {"Content-Type": "application/json", "Idempotency-Key": key}
        async with self._session.post(
            f"{self._url}/webhooks/{TRIGGER_ID}", data=PAYLOAD.read_bytes(), headers=headers
        ) as response:
            body = await response.json(content_type=None)
        return response.status, str(body.get("event_id", ""))


async def seed(admin: Admin, count: int) -> tuple[list[str], list[str]]:
    """Send dup-1 .. dup-N once, so the duplicate scenarios find every key already received.

    Returns the event ids answered 202 and 200, for the checks."""
    async with asyncio.timeout(10):  # the receiver caches "no such trigger" for a moment
        while (first := await admin.deliver("dup-1"))[0] == 404:  # noqa: ASYNC110 - polling
            await asyncio.sleep(0.2)
    gate = asyncio.Semaphore(32)

    async def one(n: int) -> tuple[int, str]:
        async with gate:
            return await admin.deliver(f"dup-{n}")

    answers = [first, *await asyncio.gather(*map(one, range(2, count + 1)))]
    new = [event_id for status, event_id in answers if status == 202]
    return new, [event_id for status, event_id in answers if status == 200]


@dataclass(slots=True)
class _Samples:
    lags: list[int] = field(default_factory=list)
    checkpointing: list[bool] = field(default_factory=list)


# The checkpointer between checkpoints waits in `CheckpointerMain`; any other wait (the pauses of
# a spread checkpoint's writes, its syncs) or none is a checkpoint in progress.
_CHECKPOINTING = (
    "SELECT coalesce(wait_event, '') <> 'CheckpointerMain' FROM pg_stat_activity"
    " WHERE backend_type = 'checkpointer'"
)


async def sample_checkpointer(pg_url: str, into: list[bool], every_s: float = 0.1) -> None:
    """Append to `into`, every `every_s` until cancelled, whether the PostgreSQL server is
    checkpointing."""
    conn = await asyncpg.connect(pg_url)
    try:
        while True:
            into.append(bool(await conn.fetchval(_CHECKPOINTING)))
            await asyncio.sleep(every_s)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _watch(
    server: servers.Server, admin: Admin | None, pg_url: str | None
) -> AsyncIterator[_Samples]:
    """Sample RSS (and the projector's lag, when there is one, and whether PostgreSQL is
    checkpointing, when it is on PostgreSQL) while the body runs."""
    samples = _Samples()

    async def sample_lag() -> None:
        while admin is not None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                samples.lags.append(await admin.lag())
            await asyncio.sleep(0.25)

    server.sampled_peak = 0
    tasks = [asyncio.create_task(servers.sample_rss(server)), asyncio.create_task(sample_lag())]
    if pg_url is not None:
        tasks.append(asyncio.create_task(sample_checkpointer(pg_url, samples.checkpointing)))
    try:
        yield samples
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _time_to_zero(admin: Admin) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < LAG_ZERO_TIMEOUT_S:
        if await admin.lag() == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


def _point(server: servers.Server, load: Load, result: LoadResult) -> Point:
    return Point(
        server=server.name,
        scenario=load.scenario,
        connections=load.connections,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        max_ms=result.max_ms,
        rss_mb=server.sampled_peak / _MB,
        requests=result.requests,
        new=len(result.new_ids),
        dup=len(result.dup_ids),
        others=result.others,
        errors=result.errors,
    )


class _Measure:
    """Runs the plan's loads against one server and keeps what the load generators were told."""

    def __init__(
        self,
        plan: Plan,
        server: servers.Server,
        admin: Admin | None,
        pg_url: str | None = None,
    ) -> None:
        self.plan, self.server, self.admin, self.pg_url = plan, server, admin, pg_url
        self.new_ids: list[str] = []
        self.dup_ids: list[str] = []
        self.in_flight = 0

    async def load(self, load: Load) -> tuple[LoadResult, _Samples]:
        out = self.plan.workdir / f"{self.server.name}-{load.prefix}.json"
        async with _watch(self.server, self.admin, self.pg_url) as samples:
            result = await run_load(self.plan.wrk, self.server.url, load, out)
        self.new_ids += result.new_ids
        self.dup_ids += result.dup_ids
        self.in_flight += load.connections + result.errors.get("timeout", 0)
        return result, samples

    async def point(self, scenario: str, connections: int) -> Point:
        load = Load(
            scenario, connections, self.plan.seconds, f"{scenario}-c{connections}", DUP_KEYS
        )
        result, samples = await self.load(load)
        point = _point(self.server, load, result)
        if self.admin is not None:
            point.lag_max_events = max(samples.lags, default=0)
            point.lag_zero_s = await _time_to_zero(self.admin)
        if samples.checkpointing:
            point.pg_checkpointing = sum(samples.checkpointing) / len(samples.checkpointing)
        return point

    def acknowledged(self) -> Acknowledged:
        return Acknowledged(self.new_ids, self.dup_ids, self.in_flight)


async def _measure(measure: _Measure, progress: Progress) -> list[Point]:
    plan = measure.plan
    await measure.load(Load("new", 16, plan.warmup_s, "warmup", DUP_KEYS))
    points = []
    for scenario in plan.scenarios:
        for connections in plan.concurrency:
            progress(f"{measure.server.name} {scenario} c={connections}", None)
            points.append(await measure.point(scenario, connections))
            progress("", points[-1])
    return points


async def run_baseline(plan: Plan, progress: Progress) -> ServerRun:
    async with servers.baseline(plan.workdir) as server:
        points = await _measure(_Measure(plan, server, None), progress)
        return ServerRun("baseline", points, server.peak_rss() / _MB)


async def run_floor(plan: Plan, progress: Progress) -> ServerRun:
    """The floor (bench/floor.py): a reference, judged by no target and checked by no check."""
    async with servers.floor(plan.workdir) as server:
        points = await _measure(_Measure(plan, server, None), progress)
        return ServerRun("floor", points, server.peak_rss() / _MB)


async def run_hookledger(
    name: str, database_url: str, plan: Plan, progress: Progress, workers: int = 0
) -> ServerRun:
    async with (
        servers.hookledger(name, database_url, plan.workdir, workers) as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
    ):
        admin = Admin(session, server)
        await admin.create_trigger()
        measure = _Measure(plan, server, admin, postgres_dsn(database_url))
        seeded_new, seeded_dup = await seed(admin, DUP_KEYS)
        measure.new_ids += seeded_new
        measure.dup_ids += seeded_dup
        points = await _measure(measure, progress)
        run = ServerRun(name, points, server.peak_rss() / _MB)
        # Checked while the server still runs: requests in flight when the load stopped are
        # committed and must be folded by the live projector, as in production.
        progress(f"{name}: checking the log and the projections:", None)
        run.checks = await _checks(database_url, measure.acknowledged())
    return run


async def _checks(database_url: str, acks: Acknowledged) -> list[Check]:
    engine = create_engine(database_url)
    try:
        return [*await check_log(engine, TRIGGER_ID, acks), *await check_projections(engine)]
    finally:
        await engine.dispose()


def as_json(run: ServerRun) -> dict[str, Any]:
    return {
        "server": run.name,
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "points": [{k: getattr(p, k) for k in Point.__slots__} for p in run.points],
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in run.checks],
    }
