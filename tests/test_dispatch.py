"""The dispatcher against a real local destination, on both backends."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import secrets
import socket
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from conftest import ADMIN_TOKEN, AUTH, MakeClient, create_trigger, serve_app
from destinations import (
    Client,
    Destination,
    EndlessBody,
    Hang,
    Reply,
    closed_port,
    execution,
    hanging_tcp_server,
    send,
    types,
    wait_until,
)
from standardwebhooks.webhooks import Webhook

from ledger.codec import format_time
from ledger.events import ExecutionStarted, NewEvent, execution_stream
from ledger.store import create_engine
from projections.rebuild import rebuild
from projections.registry import TRIGGER_EXECUTIONS
from projections.trigger_executions import table as executions
from server import dispatcher as dispatcher_module
from server.app import make_app
from server.config import Settings
from server.state import SERVICES

FAST = {"max_attempts": 5, "base_s": 0.01, "cap_s": 0.05}
HOOKLEDGER = str(Path(sys.executable).parent / "hookledger")


async def trigger_to(
    client: Client,
    url: str,
    *,
    trigger_id: str = "t",
    retry: dict[str, Any] | None = None,
    timeout_s: float = 5.0,
    secret: str | None = None,
) -> None:
    destination: dict[str, Any] = {"url": url, "timeout_s": timeout_s}
    if secret:
        destination["secret"] = secret
    await create_trigger(client, id=trigger_id, destination=destination, retry=retry or FAST)


def event(row: dict[str, Any], type_name: str, index: int = 0) -> dict[str, Any]:
    return [e for e in row["events"] if e["type"] == type_name][index]["data"]  # type: ignore[no-any-return]


async def test_2xx_delivers_the_exact_body_once_with_signed_headers_and_the_key(
    app: Client,
    destination: Destination,
) -> None:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    await trigger_to(app, destination.script("/ok", Reply(200)), secret=secret)
    body = '{"b": 1,  "a": [1.0, 1e2], "big": 123456789012345678901234567890}'
    execution_id = await send(app, "t", body, Idempotency_Key="order-42")
    row = await wait_until(app, execution_id)
    assert row["status"] == "succeeded"
    assert (row["attempts"], row["last_status_code"], row["error_category"]) == (1, 200, None)
    assert types(row) == ["webhook.received", "execution.started", "execution.succeeded"]
    assert event(row, "execution.succeeded")["duration_ms"] >= 0
    [received] = destination.of(execution_id)
    assert received.body == body.encode()  # byte for byte, never re-serialised
    assert received.headers["Content-Type"] == "application/json"
    assert received.headers["Idempotency-Key"] == "order-42"
    Webhook(secret).verify(received.body, received.headers, json_parse=False)


async def test_500_then_200_is_retried_under_one_webhook_id(
    app: Client,
    destination: Destination,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="server.dispatcher")
    await trigger_to(app, destination.script("/flaky", Reply(500), Reply(200)))
    execution_id = await send(app, "t")
    row = await wait_until(app, execution_id)
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("succeeded", 2, 200)
    assert types(row)[1:] == [
        "execution.started",
        "execution.failed",
        "execution.started",
        "execution.succeeded",
    ]
    failed = event(row, "execution.failed")
    assert (failed["attempt"], failed["error_category"], failed["status_code"]) == (
        1,
        "transient",
        500,
    )
    assert failed["retry_at"] is not None
    assert [event(row, "execution.started", i)["attempt"] for i in (0, 1)] == [1, 2]
    assert {r.headers["webhook-id"] for r in destination.of(execution_id)} == {execution_id}
    assert {r.headers["Idempotency-Key"] for r in destination.of(execution_id)} == {execution_id}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evt=attempt ")]
    assert len(lines) == 2 and "outcome=failed" in lines[0] and "outcome=succeeded" in lines[1]


async def test_each_attempt_is_counted_in_the_metrics(
    app: Client, destination: Destination
) -> None:
    await trigger_to(app, destination.script("/metered", Reply(500), Reply(200)))
    execution_id = await send(app, "t")
    assert (await wait_until(app, execution_id))["status"] == "succeeded"
    text = await (await app.get("/metrics", headers=AUTH)).text()
    counts = {
        outcome: line.rsplit(" ", 1)[1]
        for line in text.splitlines()
        if line.startswith("hookledger_dispatch_attempt_seconds_count")
        for outcome in ("succeeded", "failed_transient")
        if f'outcome="{outcome}"' in line and 'trigger_id="t"' in line
    }
    assert counts == {"succeeded": "1.0", "failed_transient": "1.0"}


async def test_503_with_retry_after_waits_as_long_as_asked(
    app: Client,
    destination: Destination,
) -> None:
    url = destination.script("/busy", Reply(503, {"Retry-After": "1"}), Reply(200))
    await trigger_to(app, url, retry={"max_attempts": 3, "base_s": 0.01, "cap_s": 5})
    execution_id = await send(app, "t")
    row = await wait_until(app, execution_id)
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    first, second = destination.of(execution_id)
    assert second.at - first.at >= 0.95
    failed = next(e for e in row["events"] if e["type"] == "execution.failed")
    started = next(e for e in row["events"] if e["type"] == "execution.started")
    # retry_at is the answer's time + Retry-After; the claim was recorded before the request went
    # out, so it bounds that time from below (the failure's own recorded_at comes after a commit).
    wait = datetime.fromisoformat(failed["data"]["retry_at"]) - datetime.fromisoformat(
        started["recorded_at"]
    )
    assert 0.95 <= wait.total_seconds() <= 1.5 + 5.0  # + at most the attempt's timeout


@pytest.mark.parametrize("status", [400, 410, 302])
async def test_client_errors_gone_and_redirects_are_permanent_after_one_attempt(
    app: Client,
    destination: Destination,
    status: int,
) -> None:
    reply = Reply(status, {"Location": destination.url("/elsewhere")} if status == 302 else {})
    await trigger_to(app, destination.script("/no", reply))
    execution_id = await send(app, "t")
    row = await wait_until(app, execution_id)
    assert row["status"] == "dead_lettered"
    assert (row["attempts"], row["error_category"], row["last_status_code"]) == (
        1,
        "permanent",
        status,
    )
    assert event(row, "execution.dead_lettered")["reason"] == "permanent_error"
    assert destination.count(execution_id) == 1
    assert not [r for r in destination.received if r.path == "/elsewhere"]  # never followed


async def test_transient_failures_run_a_short_policy_to_exhaustion(
    app: Client,
    destination: Destination,
) -> None:
    retry = {"max_attempts": 3, "base_s": 0.01, "cap_s": 0.02}
    await trigger_to(app, destination.script("/down", Reply(502)), retry=retry)
    execution_id = await send(app, "t")
    row = await wait_until(app, execution_id)
    assert (row["status"], row["attempts"], row["error_category"]) == (
        "dead_lettered",
        3,
        "transient",
    )
    assert event(row, "execution.dead_lettered")["reason"] == "attempts_exhausted"
    assert event(row, "execution.failed", 2)["retry_at"] is None
    assert destination.count(execution_id) == 3
    assert row["next_attempt_at"] is None and row["completed_at"] is not None


async def test_a_slow_destination_times_out_and_the_attempt_is_retried(
    app: Client,
    destination: Destination,
) -> None:
    url = destination.script("/slow", Reply(200, delay_s=3), Reply(200))
    await trigger_to(app, url, timeout_s=0.3)
    execution_id = await send(app, "t")
    row = await wait_until(app, execution_id)
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    failed = event(row, "execution.failed")
    assert failed["error_category"] == "transient" and "timeout" in failed["error"]
    assert failed["status_code"] is None and 250 <= failed["duration_ms"] < 2000


async def test_a_destination_that_hangs_is_cut_off_at_each_timeout(app: Client) -> None:
    server, port = await hanging_tcp_server()
    try:
        retry = {"max_attempts": 2, "base_s": 0.01, "cap_s": 0.02}
        await trigger_to(app, f"http://127.0.0.1:{port}/", retry=retry, timeout_s=0.3)
        execution_id = await send(app, "t")
        row = await wait_until(app, execution_id)
    finally:
        server.close()
    assert (row["status"], row["attempts"], row["error_category"]) == (
        "dead_lettered",
        2,
        "transient",
    )
    assert all("timeout" in event(row, "execution.failed", i)["error"] for i in (0, 1))


async def test_an_endless_response_body_is_read_only_up_to_the_cap(
    app: Client,
    destination: Destination,
) -> None:
    await trigger_to(app, destination.script("/stream", EndlessBody()), timeout_s=5)
    execution_id = await send(app, "t")
    row = await wait_until(app, execution_id)
    assert (row["status"], row["last_status_code"]) == ("succeeded", 200)
    # Done long before the 5 s timeout: reading stopped at the cap, the stream never ended.
    assert event(row, "execution.succeeded")["duration_ms"] < 4000


async def test_connection_refused_is_transient(app: Client) -> None:
    retry = {"max_attempts": 2, "base_s": 0.01, "cap_s": 0.02}
    await trigger_to(app, f"http://127.0.0.1:{closed_port()}/", retry=retry)
    execution_id = await send(app, "t")
    row = await wait_until(app, execution_id)
    assert (row["status"], row["attempts"], row["error_category"]) == (
        "dead_lettered",
        2,
        "transient",
    )
    assert row["last_status_code"] is None
    assert "Connect" in row["last_error"] or "connect" in row["last_error"]


async def test_an_answer_that_cannot_be_parsed_is_transient(app: Client) -> None:
    # aiohttp reports an answer it cannot parse as a ClientResponseError with status 400, its
    # own code and not the destination's: that was taken for a 4xx and dead-lettered at once.
    answers = [
        b"HTTP/1.1 garbled\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *([0-9]+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        writer.write(answers.pop(0) if len(answers) > 1 else answers[0])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        await trigger_to(app, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        row = await wait_until(app, await send(app, "t"))
    finally:
        server.close()
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    failed = event(row, "execution.failed")
    assert (failed["error_category"], failed["status_code"]) == ("transient", None)
    assert failed["retry_at"] is not None


async def test_the_dispatcher_looks_after_what_may_be_due_not_after_duplicates_or_recorded(
    aiohttp_client: MakeClient,
    dispatching: Settings,
    lane: str,
    destination: Destination,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Polling once a minute: a delivery dispatched within seconds was woken for.
    app = await serve_app(aiohttp_client, make_app(replace(dispatching, dispatch_poll_s=60)), lane)
    looks: list[float] = []  # each look of the dispatcher for due executions
    find_due = dispatcher_module.find_due

    async def counted(*args: Any, **kwargs: Any) -> Any:
        looks.append(time.monotonic())
        return await find_due(*args, **kwargs)

    monkeypatch.setattr(dispatcher_module, "find_due", counted)

    async def settled() -> int:
        """The number of looks, once 0.3 s went by without one."""
        for _ in range(50):
            count = len(looks)
            await asyncio.sleep(0.3)
            if len(looks) == count:
                return count
        raise AssertionError("the dispatcher never stopped looking")

    await create_trigger(app, id="kept")  # no destination: its deliveries are `recorded`
    await trigger_to(app, destination.script("/ok", Reply(200)))
    started = time.monotonic()
    execution_id = await send(app, "t", Idempotency_Key="order-1")
    row = await wait_until(app, execution_id, within_s=10)
    assert row["status"] == "succeeded" and time.monotonic() - started < 10
    before = await settled()

    for n in range(8):  # duplicates of a dispatched delivery, and deliveries kept only
        assert (
            await app.post("/webhooks/t", json={"n": 1}, headers={"Idempotency-Key": "order-1"})
        ).status == 200
        await send(app, "kept", f'{{"n": {n}}}')
    row = await execution(app, execution_id)
    assert row["duplicate_count"] == 8  # all folded
    await asyncio.sleep(0.3)
    assert len(looks) == before  # not one look for them
    assert destination.count(execution_id) == 1

    later = await send(app, "t", Idempotency_Key="order-2")  # and a pending one is looked for
    assert (await wait_until(app, later, within_s=10))["status"] == "succeeded"
    assert len(looks) > before


async def test_a_paused_trigger_holds_its_executions_and_drains_them_on_resume(
    app: Client,
    destination: Destination,
) -> None:
    await trigger_to(app, destination.script("/ok", Reply(200)))
    assert (await app.post("/api/triggers/t/pause", headers=AUTH)).status == 200
    ids = [await send(app, "t", f'{{"n": {n}}}') for n in range(3)]
    await asyncio.sleep(0.4)  # several dispatcher rounds: none may take a held execution
    assert [(await execution(app, i))["status"] for i in ids] == ["pending"] * 3
    assert destination.received == []
    assert (await app.post("/api/triggers/t/resume", headers=AUTH)).status == 200
    rows = [await wait_until(app, i) for i in ids]
    assert [r["status"] for r in rows] == ["succeeded"] * 3
    assert all(destination.count(i) == 1 for i in ids)


async def test_a_deleted_trigger_dead_letters_its_waiting_executions(
    app: Client,
    destination: Destination,
) -> None:
    url = destination.script("/later", Reply(503, {"Retry-After": "3600"}))
    await trigger_to(app, url, retry={"max_attempts": 5, "base_s": 1, "cap_s": 3600})
    retrying = await send(app, "t", '{"n": 1}')
    await wait_until(app, retrying, ("retrying",))
    assert (await app.post("/api/triggers/t/pause", headers=AUTH)).status == 200
    pending = await send(app, "t", '{"n": 2}')
    assert (await app.delete("/api/triggers/t", headers=AUTH)).status == 204
    for execution_id in (retrying, pending):
        row = await wait_until(app, execution_id)
        assert (row["status"], row["error_category"]) == ("dead_lettered", "permanent")
        assert event(row, "execution.dead_lettered")["reason"] == "trigger_deleted"
    assert destination.count(pending) == 0 and destination.count(retrying) == 1


async def test_a_lease_run_out_under_a_paused_then_deleted_trigger_is_dead_lettered(
    app: Client,
    destination: Destination,
) -> None:
    # A worker died mid-attempt; its trigger was paused, then deleted (never to be resumed).
    # Its lease still runs out and the execution ends dead-lettered (it stayed running for
    # good: a paused trigger's rows were never due, and deletion took only the waiting ones).
    await trigger_to(app, destination.script("/ok", Reply(200)))
    assert (await app.post("/api/triggers/t/pause", headers=AUTH)).status == 200
    execution_id = await send(app, "t")
    await wait_until(app, execution_id, ("pending",))
    services = app.app[SERVICES]
    lost = ExecutionStarted(
        attempt=1,
        lease_until=format_time(datetime.now(UTC) - timedelta(seconds=1)),
        worker="gone:1:dead",
    )
    stream = execution_stream(execution_id)
    appended = await services.appender.append([NewEvent.of(stream, "t", lost)], expected_version=1)
    await services.runner.wait_for(appended[-1].seq)
    assert (await app.delete("/api/triggers/t", headers=AUTH)).status == 204
    row = await wait_until(app, execution_id)
    assert (row["status"], row["attempts"]) == ("dead_lettered", 1)
    assert types(row)[-2:] == ["execution.failed", "execution.dead_lettered"]
    assert "lease expired" in event(row, "execution.failed")["error"]
    assert event(row, "execution.dead_lettered")["reason"] == "trigger_deleted"
    assert destination.received == []


async def test_a_backlog_drains_at_a_bounded_concurrency_per_destination(
    aiohttp_client: MakeClient, dispatching: Settings, destination: Destination
) -> None:
    app = await aiohttp_client(make_app(replace(dispatching, destination_concurrency=2)))
    await trigger_to(app, destination.script("/slowish", Reply(200, delay_s=0.1)))
    assert (await app.post("/api/triggers/t/pause", headers=AUTH)).status == 200
    ids = [await send(app, "t", f'{{"n": {n}}}') for n in range(8)]
    assert (await app.post("/api/triggers/t/resume", headers=AUTH)).status == 200
    for execution_id in ids:
        assert (await wait_until(app, execution_id))["status"] == "succeeded"
    assert destination.max_in_flight == 2


async def test_the_concurrency_set_is_the_concurrency_reached_past_a_hundred(
    aiohttp_client: MakeClient, dispatching: Settings, destination: Destination
) -> None:
    # aiohttp's connector holds at most 100 connections unless told otherwise: attempts past
    # that waited for one inside their own timeout, below the concurrency the settings asked for.
    wide = replace(dispatching, dispatch_concurrency=120, destination_concurrency=120)
    app = await aiohttp_client(make_app(wide))
    await trigger_to(app, destination.script("/slow", Reply(200, delay_s=1.5)))
    assert (await app.post("/api/triggers/t/pause", headers=AUTH)).status == 200
    ids = [await send(app, "t", f'{{"n": {n}}}') for n in range(115)]
    assert (await app.post("/api/triggers/t/resume", headers=AUTH)).status == 200
    for execution_id in ids:
        assert (await wait_until(app, execution_id))["status"] == "succeeded"
    assert destination.max_in_flight == 115


async def test_a_repeat_during_an_attempt_keeps_its_outcome_and_sends_once(
    app: Client, destination: Destination, caplog: pytest.LogCaptureFixture
) -> None:
    # The repeat's webhook.duplicate goes on the execution's stream while the attempt is in
    # flight: it moves the stream's version, not the attempt, whose outcome must still land
    # (it was lost: the attempt ran again after its lease, with the destination hit twice).
    caplog.set_level(logging.INFO, logger="server.dispatcher")
    await trigger_to(app, destination.script("/slow", Reply(200, delay_s=1.0)), retry=FAST)
    execution_id = await send(app, "t", Idempotency_Key="k")
    await asyncio.wait_for(destination.arrived.wait(), 10)
    for _ in range(2):  # the attempt is in flight: two repeats of the delivery
        response = await app.post(
            "/webhooks/t",
            data='{"n": 1}',
            headers={"Content-Type": "application/json", "Idempotency-Key": "k"},
        )
        assert response.status == 200
    row = await wait_until(app, execution_id)
    assert (row["status"], row["attempts"], row["duplicate_count"]) == ("succeeded", 1, 2)
    assert types(row) == [
        "webhook.received",
        "execution.started",
        "webhook.duplicate",
        "webhook.duplicate",
        "execution.succeeded",
    ]
    await asyncio.sleep(0.5)  # a lost outcome would show as a second attempt after the lease
    assert destination.count(execution_id) == 1
    assert "attempt_outcome_lost" not in caplog.text


async def test_two_dispatchers_never_run_the_same_attempt(
    aiohttp_client: MakeClient, dispatching: Settings, destination: Destination
) -> None:
    first = await aiohttp_client(make_app(dispatching))
    second = await aiohttp_client(make_app(dispatching))
    url = destination.script("/race", Reply(500, delay_s=0.02), Reply(200, delay_s=0.02))
    await trigger_to(first, url)
    ids = [await send(first if n % 2 else second, "t", f'{{"n": {n}}}') for n in range(20)]
    rows = [await wait_until(first, i, within_s=30) for i in ids]
    assert [r["status"] for r in rows] == ["succeeded"] * 20
    assert all(destination.count(i) == 2 for i in ids), destination.counts()
    for row in rows:
        started = [e["data"]["attempt"] for e in row["events"] if e["type"] == "execution.started"]
        assert started == [1, 2]
    workers = {
        e["data"]["worker"] for r in rows for e in r["events"] if e["type"] == "execution.started"
    }
    assert len(workers) == 2  # both took part: the race was real


async def test_a_rebuild_reproduces_the_projection_after_dispatch(
    app: Client,
    destination: Destination,
    dispatching: Settings,
) -> None:
    await trigger_to(app, destination.script("/a", Reply(500), Reply(200)), trigger_id="a")
    await trigger_to(app, destination.script("/b", Reply(400)), trigger_id="b")
    ids = [await send(app, "a"), await send(app, "b"), await send(app, "a", Idempotency_Key="k")]
    headers = {"Content-Type": "application/json", "Idempotency-Key": "k"}
    assert (await app.post("/webhooks/a", data='{"n": 1}', headers=headers)).status == 200
    for execution_id in ids:
        await wait_until(app, execution_id)
    engine = create_engine(dispatching.database_url)
    try:
        query = sa.select(executions).order_by(executions.c.execution_id)
        async with engine.connect() as conn:
            live = [dict(r) for r in (await conn.execute(query)).mappings()]
        await rebuild(engine, TRIGGER_EXECUTIONS)
        async with engine.connect() as conn:
            rebuilt = [dict(r) for r in (await conn.execute(query)).mappings()]
    finally:
        await engine.dispose()
    assert len(live) == 3 and rebuilt == live


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _start(args: list[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            HOOKLEDGER, *args, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )


async def _wait_healthy(port: int, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        return
            assert time.monotonic() < deadline, "hookledger serve did not start"
            await asyncio.sleep(0.1)


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
    await process.wait()


@pytest.mark.slow
async def test_a_worker_killed_mid_attempt_loses_nothing(
    client: Client,
    settings: Settings,
    destination: Destination,
    tmp_path: Path,
) -> None:
    env = os.environ | {
        "HOOKLEDGER_DATABASE_URL": settings.database_url,
        "HOOKLEDGER_ADMIN_TOKEN": ADMIN_TOKEN,
        "HOOKLEDGER_SECRET_KEY": "test-secret-key",
        "HOOKLEDGER_LEASE_S": "1",
        "HOOKLEDGER_DISPATCH_POLL_S": "0.05",
        "HOOKLEDGER_LOG_FORMAT": "json",
    }
    url = destination.script("/once", Hang(), Reply(200))
    port = _free_port()
    server = await _start(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    worker: asyncio.subprocess.Process | None = None
    try:
        await _wait_healthy(port)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers=AUTH) as api:
            trigger = {"id": "t", "destination": {"url": url, "timeout_s": 3}, "retry": FAST}
            async with api.post("/api/triggers", json=trigger) as response:
                assert response.status == 201, await response.text()
            async with api.post(
                "/webhooks/t", data="{}", headers={"Content-Type": "application/json"}
            ) as response:
                execution_id = (await response.json())["execution_id"]
        await asyncio.wait_for(destination.arrived.wait(), 15)
        server.kill()  # SIGKILL during the attempt: no goodbye, no outcome
        await server.wait()
        worker = await _start(["dispatch"], env, tmp_path / "dispatch.log")
        row = await wait_until(client, execution_id, within_s=30)
    finally:
        await _stop(server)
        if worker is not None:
            await _stop(worker)
    assert (row["status"], row["attempts"]) == ("succeeded", 2), (
        tmp_path / "dispatch.log"
    ).read_text()
    assert types(row) == [
        "webhook.received",
        "execution.started",
        "execution.failed",
        "execution.started",
        "execution.succeeded",
    ]
    first, lost, second = row["events"][1:4]
    assert lost["data"]["attempt"] == 1 and "lease expired" in lost["data"]["error"]
    assert second["data"]["attempt"] == 2
    assert first["data"]["worker"] != second["data"]["worker"]
    # The second worker waited for the first one's lease to run out.
    assert datetime.fromisoformat(second["recorded_at"]) >= datetime.fromisoformat(
        first["data"]["lease_until"]
    )
    assert destination.count(execution_id) == 2


async def test_a_destination_refused_at_connect_time_is_permanent(
    aiohttp_client: MakeClient, dispatching: Settings, destination: Destination
) -> None:
    # Configured where loopback was allowed, dispatched by a worker where it is not.
    strict = await aiohttp_client(make_app(replace(dispatching, allow_private_destinations=False)))
    lenient = await aiohttp_client(make_app(replace(dispatching, dispatch=False)))
    await trigger_to(lenient, destination.script("/private", Reply(200)))
    execution_id = await send(lenient, "t")
    row = await wait_until(strict, execution_id)
    assert (row["status"], row["attempts"], row["error_category"]) == (
        "dead_lettered",
        1,
        "permanent",
    )
    assert "loopback" in row["last_error"]
    assert destination.received == []


async def test_a_body_that_is_not_utf8_reaches_the_destination_byte_for_byte(
    app: Client, destination: Destination
) -> None:
    await trigger_to(app, destination.script("/raw", Reply(200)))
    raw = b"caf\xe9 \xff\x00 latin-1 text"
    response = await app.post("/webhooks/t", data=raw, headers={"Content-Type": "text/plain"})
    assert response.status == 202
    execution_id = (await response.json())["execution_id"]
    assert (await wait_until(app, execution_id))["status"] == "succeeded"
    [received] = destination.of(execution_id)
    assert received.body == raw and received.headers["Content-Type"] == "text/plain"


async def test_the_due_query_probes_indexes_not_the_backlog(
    database_url: str, backend: str
) -> None:
    """Each branch of the dispatcher's page query rides an index: the due rows by status and
    time, a deleted trigger's waiting rows by trigger and status — never a walk over every
    execution (the OR it replaces visited every pending and retrying row at every poll)."""
    from ledger.migrate import upgrade
    from server.due import due_query

    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        await _seed_a_backlog(engine)
        query = due_query(datetime.now(UTC), 64, ["x"], ["busy"])
        async with engine.connect() as conn:
            if backend == "postgres":
                await conn.exec_driver_sql("ANALYZE trigger_executions")
                await conn.exec_driver_sql("ANALYZE triggers")
            sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
            if backend == "postgres":
                await conn.exec_driver_sql("SET enable_seqscan = off")
                plan = "\n".join(r[0] for r in await conn.exec_driver_sql("EXPLAIN " + sql))
                walks = [
                    line for line in plan.splitlines() if "Seq Scan on trigger_executions" in line
                ]
            else:
                rows = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)
                plan = "\n".join(str(r[-1]) for r in rows)
                walks = [
                    line for line in plan.splitlines() if line.startswith("SCAN trigger_executions")
                ]
    finally:
        await engine.dispose()
    assert "ix_trigger_executions_status_next_attempt_at" in plan, plan
    assert "ix_trigger_executions_trigger_id_status" in plan, plan
    assert not walks, plan


async def test_a_poll_reads_one_page_however_many_are_due(database_url: str, backend: str) -> None:
    """After an outage every waiting execution is due at once: a poll still reads about one page
    (each status's index walked in time order and cut at the page's size), never every due row
    sorted for the first 64."""
    from ledger.migrate import upgrade
    from server.due import due_query

    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        await _seed_a_backlog(engine)
        await _seed_a_backlog(engine, due=300)
        async with engine.connect() as conn:
            sql = str(
                due_query(datetime.now(UTC), 64).compile(
                    dialect=conn.dialect, compile_kwargs={"literal_binds": True}
                )
            )
        if backend == "postgres":
            async with engine.connect() as conn:
                # statistics as autovacuum keeps them (a deleted trigger's few rows otherwise
                # look no rarer than every waiting row)
                await conn.exec_driver_sql("ANALYZE trigger_executions")
                await conn.exec_driver_sql("ANALYZE triggers")
                plan = [r[0] for r in await conn.exec_driver_sql("EXPLAIN ANALYZE " + sql)]
            # every node that reads trigger_executions hands on at most a page of rows
            read = [
                int(match.group(1))
                for line in plan
                if "trigger_executions" in line
                and (match := re.search(r"actual time=\S+ rows=(\d+)", line))
            ]
            assert read and max(read) <= 64, "\n".join(plan)
            return
        # SQLite: the virtual machine's steps for the page, with 300 due and then with 3,000
        path = database_url.split("///", 1)[1]
        before = _sqlite_steps(path, sql)
        await _seed_a_backlog(engine, due=2700, first=300)
        after = _sqlite_steps(path, sql)
    finally:
        await engine.dispose()
    assert after < 1.5 * before, (before, after)


def _sqlite_steps(path: str, sql: str) -> int:
    import sqlite3

    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.set_progress_handler(count, 100)
        assert len(conn.execute(sql).fetchall()) == 64
    return steps


async def _seed_a_backlog(engine: Any, *, due: int = 0, first: int = 0) -> None:
    """3,000 executions waiting to be retried later for a live trigger, 3 of a deleted one
    (with `due`: that many pending executions of the live trigger due now instead, numbered
    from `first`)."""
    from projections.triggers import table as triggers_table

    now = datetime.now(UTC)
    later = now.replace(year=now.year + 1)
    earlier = now.replace(year=now.year - 1)

    def trigger(trigger_id: str, deleted: bool) -> dict[str, Any]:
        return {
            "id": trigger_id,
            "source": "generic",
            "secrets": "[]",
            "paused": False,
            "deleted": deleted,
            "created_at": now,
            "updated_at": now,
            "last_seq": 1,
            "version": 1,
        }

    def waiting(
        n: int, trigger_id: str, status: str = "retrying", at: datetime = later
    ) -> dict[str, Any]:
        return {
            "execution_id": f"{trigger_id}-{status}-{n:05d}",
            "trigger_id": trigger_id,
            "received_event_id": f"e-{trigger_id}-{status}-{n}",
            "status": status,
            "attempts": 1,
            "next_attempt_at": at,
            "duplicate_count": 0,
            "replay_count": 0,
            "received_at": now,
            "last_seq": n,
            "version": 2,
        }

    async with engine.begin() as conn:
        if due:
            rows = [
                waiting(n, "live", "pending", earlier + timedelta(seconds=n))
                for n in range(first, first + due)
            ]
            await conn.execute(executions.insert(), rows)
            return
        await conn.execute(triggers_table.insert(), [trigger("live", False), trigger("gone", True)])
        rows = [waiting(n, "live") for n in range(3000)] + [waiting(n, "gone") for n in range(3)]
        await conn.execute(executions.insert(), rows)
