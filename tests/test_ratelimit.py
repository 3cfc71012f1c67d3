"""Rate limits: token buckets, a trigger's ingestion limit, and the admin API's per-client limit."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import AUTH, MakeClient, create_trigger
from test_receiver import deliveries, post

from ledger.store import create_engine, read_events
from server.app import make_app
from server.config import Settings
from server.ratelimit import MAX_BUCKETS, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_gives_its_burst_then_one_token_per_interval() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    assert [limiter.wait_s("k", 2, 3) for _ in range(3)] == [0, 0, 0]
    assert limiter.wait_s("k", 2, 3) == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.wait_s("k", 2, 3) == 0
    assert limiter.wait_s("k", 2, 3) > 0
    clock.now += 60  # refills up to the burst, never beyond
    assert [limiter.wait_s("k", 2, 3) for _ in range(4)].count(0) == 3


def test_buckets_are_per_key_and_bounded_in_number() -> None:
    limiter = RateLimiter(Clock())
    assert limiter.wait_s("a", 1, 1) == 0
    assert limiter.wait_s("a", 1, 1) > 0
    assert limiter.wait_s("b", 1, 1) == 0
    for i in range(MAX_BUCKETS + 10):
        limiter.wait_s(f"k{i}", 1, 1)
    assert len(limiter._buckets) == MAX_BUCKETS


def test_a_new_limit_starts_a_fresh_bucket() -> None:
    limiter = RateLimiter(Clock())
    assert limiter.wait_s("t", 1, 1) == 0
    assert limiter.wait_s("t", 1, 1) > 0
    assert limiter.wait_s("t", 5, 5) == 0


async def test_a_trigger_over_its_limit_gets_429_with_retry_after(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t", rate_limit={"per_s": 0.1, "burst": 2})
    statuses = [(await post(client, "{}")).status for _ in range(2)]
    refused = await post(client, "{}")
    assert statuses == [202, 202]
    assert refused.status == 429
    assert 5 < int(refused.headers["Retry-After"]) <= 10  # a token comes back every 10 s
    assert (await refused.json())["error"]["code"] == "rate_limited"
    assert len(await deliveries(settings)) == 2


async def test_no_limit_unless_a_trigger_sets_one(client: TestClient) -> None:  # type: ignore[type-arg]
    created = await create_trigger(client, id="t")
    assert created["rate_limit"] is None
    assert {(await post(client, "{}")).status for _ in range(30)} == {202}


async def test_limits_are_per_trigger(client: TestClient) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="slow", rate_limit={"per_s": 0.1, "burst": 1})
    await create_trigger(client, id="fast")
    assert (await post(client, "{}", trigger="slow")).status == 202
    assert (await post(client, "{}", trigger="slow")).status == 429
    assert (await post(client, "{}", trigger="fast")).status == 202


async def test_unsigned_deliveries_do_not_spend_a_signed_triggers_tokens(
    client: TestClient,
) -> None:  # type: ignore[type-arg]
    from signing import sign

    await create_trigger(client, id="t", secret="s3cret", rate_limit={"per_s": 0.1, "burst": 1})
    for _ in range(5):
        assert (await post(client, "{}", X_Signature_256="sha256=" + "0" * 64)).status == 401
    headers = {k: v for k, v in sign("generic", "s3cret", b"{}").items()}
    response = await client.post(
        "/webhooks/t", data=b"{}", headers={"Content-Type": "application/json"} | headers
    )
    assert response.status == 202


async def test_the_limit_is_part_of_the_trigger_and_its_events(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t", rate_limit={"per_s": 10})
    view = await (await client.get("/api/triggers/t", headers=AUTH)).json()
    assert view["rate_limit"] == {"per_s": 10.0, "burst": 10.0}
    # One token a hundred seconds: the second delivery is refused however slow the machine
    # (at one a second, a stalled sync between the two had let it through).
    patched = await client.patch(
        "/api/triggers/t", json={"rate_limit": {"per_s": 0.01, "burst": 1}}, headers=AUTH
    )
    assert (await patched.json())["rate_limit"] == {"per_s": 0.01, "burst": 1.0}
    assert (await post(client, "{}")).status == 202
    assert (await post(client, "{}")).status == 429
    cleared = await client.patch("/api/triggers/t", json={"rate_limit": None}, headers=AUTH)
    assert (await cleared.json())["rate_limit"] is None
    assert (await post(client, "{}")).status == 202
    engine = create_engine(settings.database_url)
    async with engine.connect() as conn:
        events = await read_events(conn, limit=100, types=["trigger.registered", "trigger.updated"])
    await engine.dispose()
    assert [e.data["rate_limit"] for e in events] == [
        {"per_s": 10.0, "burst": 10.0},
        {"per_s": 0.01, "burst": 1.0},
        None,
    ]


@pytest.mark.parametrize(
    "rate_limit",
    [
        {"per_s": 0},
        {"per_s": -1},
        {"per_s": "10"},
        {"per_s": True},
        {"burst": 5},
        {"per_s": 1, "burst": 0.5},
        {"per_s": 1, "extra": 1},
        {"per_s": 10**9},
        [1, 2],
        "fast",
    ],
)
async def test_an_invalid_limit_is_refused(client: TestClient, rate_limit: Any) -> None:  # type: ignore[type-arg]
    response = await client.post(
        "/api/triggers", json={"id": "t", "rate_limit": rate_limit}, headers=AUTH
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_trigger"


async def test_the_admin_api_is_limited_per_client(
    aiohttp_client: MakeClient, settings: Settings
) -> None:
    client = await aiohttp_client(
        make_app(replace(settings, admin_rate_per_s=0.1, admin_rate_burst=3))
    )
    statuses = [(await client.get("/api/triggers", headers=AUTH)).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    refused = await client.get("/api/triggers", headers=AUTH)
    assert refused.status == 429
    assert 5 < int(refused.headers["Retry-After"]) <= 10  # a token comes back every 10 s
    assert (await refused.json())["error"]["code"] == "rate_limited"
    # Not the receiver, nor the health checks.
    assert (await client.get("/healthz")).status == 200
    assert (await post(client, "{}", trigger="nobody")).status == 404


async def test_guessing_the_admin_token_is_limited_too(
    aiohttp_client: MakeClient, settings: Settings
) -> None:
    client = await aiohttp_client(
        make_app(replace(settings, admin_rate_per_s=0.1, admin_rate_burst=3))
    )
    wrong = {"Authorization": "Bearer guess"}
    statuses = [(await client.get("/api/triggers", headers=wrong)).status for _ in range(4)]
    assert statuses == [401, 401, 401, 429]


async def test_an_admin_limit_of_zero_turns_it_off(
    aiohttp_client: MakeClient, settings: Settings
) -> None:
    client = await aiohttp_client(
        make_app(replace(settings, admin_rate_per_s=0, admin_rate_burst=1))
    )
    assert {(await client.get("/api/triggers", headers=AUTH)).status for _ in range(20)} == {200}


def test_the_admin_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOKLEDGER_ADMIN_RATE_PER_S", "5")
    monkeypatch.setenv("HOOKLEDGER_ADMIN_RATE_BURST", "7")
    settings = Settings.from_env()
    assert (settings.admin_rate_per_s, settings.admin_rate_burst) == (5, 7)
    assert Settings().admin_rate_per_s > 0  # on by default, and generous
