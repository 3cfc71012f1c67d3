"""What operators watch: /metrics after traffic, /readyz through an outage, and the logs."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
from aiohttp.test_utils import TestClient
from conftest import AUTH, create_trigger
from prometheus_client.parser import text_string_to_metric_families
from tcpproxy import TcpProxy
from traffic import DESTINATION, JSON_HEADERS, deliver, mixed_traffic, settle

from ledger.events import NewEvent
from server import logs
from server.app import make_app
from server.config import Settings
from server.state import SERVICES

MakeClient = Any


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[type-arg]
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return samples(await response.text())


def webhooks(
    trigger: str, outcome: str, reason: str = ""
) -> tuple[str, tuple[tuple[str, str], ...]]:
    labels = (("outcome", outcome), ("reason", reason), ("trigger_id", trigger))
    return ("hookledger_webhooks_received_total", labels)


async def test_metrics_after_traffic(
    client: TestClient, aiohttp_client: MakeClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await mixed_traffic(client, deliveries=30)
    for i in range(2):
        await deliver(client, "alpha", f'{{"waiting": {i}}}')  # pending, due: the backlog
    await create_trigger(client, id="signed", secret="s3cret")
    for _ in range(2):
        await client.post("/webhooks/nobody", data="{}", headers=JSON_HEADERS)
    await client.post("/webhooks/signed", data="{}", headers=JSON_HEADERS)
    await client.post("/webhooks/alpha", data="x", headers={"Content-Type": "image/png"})
    client.app[SERVICES].metrics.observe_attempt(
        "alpha", "succeeded", 0.12
    )  # the dispatcher's hook
    await settle(client)
    executions = (await (await client.get("/api/executions?limit=1000", headers=AUTH)).json())[
        "executions"
    ]
    events = (await (await client.get("/api/events?limit=1000", headers=AUTH)).json())["events"]
    got = await scrape(client)

    for trigger in ("alpha", "beta"):
        mine = [e for e in events if e["trigger_id"] == trigger]
        assert got[webhooks(trigger, "accepted")] == sum(
            e["type"] == "webhook.received" for e in mine
        )
        assert got[webhooks(trigger, "duplicate")] == sum(
            e["type"] == "webhook.duplicate" for e in mine
        )
    assert got[webhooks("", "rejected", "trigger_not_found")] == 2  # unknown ids are not labels
    assert got[webhooks("signed", "rejected", "invalid_signature")] == 1
    assert got[webhooks("alpha", "rejected", "unsupported_media_type")] == 1
    for status in ("pending", "succeeded", "dead_lettered", "filtered", "retrying"):
        expected = sum(e["status"] == status for e in executions)
        assert got[("hookledger_executions", (("status", status),))] == expected, status
    due = sum(
        e["status"] in ("pending", "retrying", "running") and e["next_attempt_at"] < "2030"
        for e in executions
    )
    assert got[("hookledger_dispatch_backlog", ())] == due >= 2
    for projection in ("triggers", "trigger_executions", "trigger_stats"):
        assert got[("hookledger_projection_lag_events", (("projection", projection),))] == 0
        assert got[("hookledger_projection_lag_seconds", (("projection", projection),))] == 0
    # Commands: one per delivery and trigger change, one per execution's appended outcome story.
    commands = sum(e["type"].startswith(("webhook.", "trigger.")) for e in events)
    commands += len({e["stream"] for e in events if e["type"].startswith("execution.")})
    assert got[("hookledger_append_batch_size_sum", ())] == commands
    assert 0 < got[("hookledger_append_batch_size_count", ())] <= commands
    assert (
        got[("hookledger_append_batch_seconds_count", ())]
        == got[("hookledger_append_batch_size_count", ())]
    )
    attempt = (("outcome", "succeeded"), ("trigger_id", "alpha"))
    assert got[("hookledger_dispatch_attempt_seconds_count", attempt)] == 1
    assert got[("hookledger_dispatch_attempt_seconds_bucket", (("le", "0.25"), *attempt))] == 1
    assert got[("hookledger_dispatch_attempt_seconds_bucket", (("le", "0.1"), *attempt))] == 0
    assert got[("hookledger_database_up", ())] == 1

    other = await aiohttp_client(make_app(settings))  # a registry of its own: nothing counted twice
    assert webhooks("alpha", "accepted") not in await scrape(other)


async def test_the_backlog_leaves_out_what_a_paused_trigger_holds(client: TestClient) -> None:  # type: ignore[type-arg]
    # The dispatcher takes nothing of a paused trigger (server/due.py): a backlog counting its
    # executions would never drain, and an alert on it would fire for a pause.
    for trigger in ("held", "open"):
        await create_trigger(client, id=trigger, destination=DESTINATION)
    assert (await client.post("/api/triggers/held/pause", headers=AUTH)).status == 200
    for i in range(3):
        await deliver(client, "held", f'{{"i": {i}}}')
    await deliver(client, "open")
    await settle(client)
    got = await scrape(client)
    assert got[("hookledger_executions", (("status", "pending"),))] == 4
    assert got[("hookledger_dispatch_backlog", ())] == 1
    assert (await client.post("/api/triggers/held/resume", headers=AUTH)).status == 200
    await settle(client)
    assert (await scrape(client))[("hookledger_dispatch_backlog", ())] == 4


async def test_readyz_fails_while_projections_lag_and_recovers(
    aiohttp_client: MakeClient, settings: Settings
) -> None:
    quiet = replace(settings, projector=False, ready_max_lag_s=0.05)
    client = await aiohttp_client(make_app(quiet))
    services = client.app[SERVICES]
    assert (await client.get("/readyz")).status == 200
    await services.appender.append(
        [NewEvent(stream="s", type="test.happened", trigger_id="t", data={})]
    )
    await asyncio.sleep(0.1)
    response = await client.get("/readyz")
    assert response.status == 503
    assert "projections behind" in (await response.json())["error"]["message"]
    lag = await scrape(client)
    assert lag[("hookledger_projection_lag_events", (("projection", "trigger_stats"),))] == 1
    assert lag[("hookledger_projection_lag_seconds", (("projection", "trigger_stats"),))] >= 0.1
    await services.runner.catch_up()
    assert (await client.get("/readyz")).status == 200


async def wait_ready(client: TestClient, expected: int, within_s: float = 15) -> dict[str, Any]:  # type: ignore[type-arg]
    async with asyncio.timeout(within_s):
        while True:
            response = await client.get("/readyz")
            if response.status == expected:
                return await response.json()  # type: ignore[no-any-return]
            await asyncio.sleep(0.2)


@pytest.fixture
async def proxy(backend: str, database_url: str) -> AsyncIterator[TcpProxy | None]:
    if backend != "postgres":
        yield None
        return
    parts = urlsplit(database_url)
    tcp = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await tcp.start()
    yield tcp
    await tcp.cut()


def behind(database_url: str, port: int) -> str:
    parts = urlsplit(database_url)
    netloc = f"{parts.username}@127.0.0.1:{port}" if parts.username else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_readyz_answers_503_while_the_database_is_unreachable_then_recovers(
    aiohttp_client: MakeClient, settings: Settings, proxy: TcpProxy | None, backend: str
) -> None:
    if proxy is not None:
        settings = replace(settings, database_url=behind(settings.database_url, proxy.port))
    client = await aiohttp_client(make_app(settings))
    await create_trigger(client, id="t")
    await deliver(client, "t")
    assert (await wait_ready(client, 200))["status"] == "ready"

    if proxy is not None:
        await proxy.cut()  # PostgreSQL: every connection dropped, new ones refused
    else:
        path = Path(settings.database_url.split("///", 1)[1])
        aside = path.with_suffix(".moved")
        os.replace(path, aside)  # SQLite: the file is gone from where it should be
    down = await wait_ready(client, 503)
    assert down["error"]["code"] == "not_ready"
    metrics = await scrape(client)
    assert metrics[("hookledger_database_up", ())] == (0 if proxy is not None else 1)
    read_from_database = {
        "hookledger_executions",
        "hookledger_projection_lag_events",
        "hookledger_projection_lag_seconds",
    }
    if proxy is not None:
        # Unknown now: not the last scrape's numbers, as if current.
        assert not {name for name, _ in metrics} & read_from_database
        assert math.isnan(metrics[("hookledger_dispatch_backlog", ())])
        refused = await client.post("/webhooks/t", data="{}", headers=JSON_HEADERS)
        assert refused.status == 503 and refused.headers["Retry-After"]
        # An id nobody made, while it cannot be looked up: refused, and never a metric label
        # (ids from the URL are unbounded).
        unknown = await client.post("/webhooks/made-up-1", data="{}", headers=JSON_HEADERS)
        assert unknown.status == 503
        assert (await unknown.json())["error"]["code"] == "storage_unavailable"
        labels = {dict(labels).get("trigger_id") for _, labels in await scrape(client)}
        assert "made-up-1" not in labels

    if proxy is not None:
        await proxy.restore()
    else:
        os.replace(aside, path)
    assert (await wait_ready(client, 200))["status"] == "ready"
    await deliver(client, "t")  # and it takes deliveries again
    metrics = await scrape(client)
    assert metrics[("hookledger_database_up", ())] == 1
    assert metrics[("hookledger_dispatch_backlog", ())] == 0
    assert {name for name, _ in metrics} >= read_from_database
    assert sum(v for (name, _), v in metrics.items() if name == "hookledger_executions") == 2


@pytest.fixture
def captured() -> Any:
    stream = io.StringIO()
    handler = logs.build_handler("json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


async def test_json_logs_carry_the_request_id_and_the_facts_as_fields(
    client: TestClient, captured: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[type-arg]
    caplog.set_level(logging.DEBUG, logger="server.receiver")  # webhook_accepted is DEBUG
    await create_trigger(client, id="t", secret="s3cret")
    await create_trigger(client, id="open")
    statuses = []
    for rid, path, body, headers in (
        ("req-accepted", "/webhooks/open", "{}", {"Idempotency-Key": "k"}),
        ("req-duplicate", "/webhooks/open", "{}", {"Idempotency-Key": "k"}),
        ("req-rejected", "/webhooks/t", "{}", {}),
        ("req-unknown", "/webhooks/ghost", "{}", {}),
    ):
        response = await client.post(
            path, data=body, headers=JSON_HEADERS | headers | {"X-Request-Id": rid}
        )
        assert response.headers["X-Request-Id"] == rid
        statuses.append(response.status)
    assert statuses == [202, 200, 401, 404]
    lines = [orjson.loads(line) for line in captured.getvalue().splitlines()]
    ours = [line for line in lines if str(line.get("request_id", "")).startswith("req-")]
    facts = {(line["request_id"], line["evt"]): line for line in ours if "evt" in line}
    accepted = facts[("req-accepted", "webhook_accepted")]
    assert accepted["trigger_id"] == "open" and accepted["event_id"]
    assert accepted["level"] == "debug"
    replay = facts[("req-duplicate", "idempotent_replay")]
    assert replay["idempotency_key"] == "k" and replay["original_event_id"] == accepted["event_id"]
    rejected = facts[("req-rejected", "webhook_rejected")]
    assert (rejected["trigger_id"], rejected["status"], rejected["reason"]) == (
        "t",
        401,
        "invalid_signature",
    )
    unknown = facts[("req-unknown", "webhook_rejected")]
    assert (unknown["status"], unknown["reason"]) == (404, "trigger_not_found")
    # Every line logged while serving those requests names its request.
    during = [
        line
        for line in lines
        if line.get("logger", "").startswith(("server.receiver", "server.monitoring"))
    ]
    assert during and all(str(line.get("request_id", "")).startswith("req-") for line in during)
