"""Replays, single and bulk, over HTTP and the CLI, against a real destination, on both backends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from conftest import ADMIN_TOKEN, AUTH, create_trigger
from destinations import Client, Destination, Reply, send, types, wait_until
from sqlalchemy.util import await_only

from server.cli import main
from server.config import Settings
from server.state import SERVICES

FAST = {"max_attempts": 3, "base_s": 0.01, "cap_s": 0.05}


async def dead_letter(app: Client, destination: Destination, **headers: str) -> str:
    """An execution dead-lettered by a 400 on its first attempt; the next attempts get 200."""
    if "/t" not in destination.scripts:
        url = destination.script("/t", Reply(400), Reply(200))
        await create_trigger(app, id="t", destination={"url": url}, retry=FAST)
    execution_id = await send(app, "t", '{"order": 7}', **headers)
    assert (await wait_until(app, execution_id))["status"] == "dead_lettered"
    return execution_id


async def replay(client: Client, execution_id: str, **body: Any) -> Any:
    return await client.post(f"/api/executions/{execution_id}/replay", json=body, headers=AUTH)


async def bulk(client: Client, **body: Any) -> Any:
    return await client.post("/api/replays", json=body, headers=AUTH)


@pytest.mark.parametrize("key", ["order-7", None])
async def test_replaying_a_dead_letter_delivers_it_again_keyed_or_not(
    app: Client,
    destination: Destination,
    key: str | None,
) -> None:
    execution_id = await dead_letter(app, destination, **({"Idempotency_Key": key} if key else {}))
    response = await replay(app, execution_id)
    assert response.status == 202
    assert await response.json() == {"execution_id": execution_id, "status": "pending"}
    row = await wait_until(app, execution_id)
    assert (row["status"], row["attempts"], row["replay_count"]) == ("succeeded", 1, 1)
    assert row["idempotency_key"] == key and row["last_replay_at"] is not None
    assert types(row)[-3:] == [
        "execution.replay_requested",
        "execution.started",
        "execution.succeeded",
    ]
    requested = next(e for e in row["events"] if e["type"] == "execution.replay_requested")
    assert requested["data"] == {"requested_by": "admin-api", "bulk_id": None}
    sent = destination.of(execution_id)
    assert len(sent) == 2 and sent[0].body == sent[1].body == b'{"order": 7}'
    assert {r.headers["Idempotency-Key"] for r in sent} == {key or execution_id}


async def test_a_succeeded_execution_can_be_replayed_as_a_redelivery(
    app: Client,
    destination: Destination,
) -> None:
    await create_trigger(app, id="ok", destination={"url": destination.script("/ok", Reply(200))})
    execution_id = await send(app, "ok")
    await wait_until(app, execution_id)
    assert (await replay(app, execution_id, requested_by="alice")).status == 202
    row = await wait_until(app, execution_id)
    assert row["status"] == "succeeded" and destination.count(execution_id) == 2


async def test_replay_of_an_unknown_execution_is_404(app: Client) -> None:
    response = await replay(app, "01900000-0000-7000-8000-000000000000")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "execution_not_found"


async def test_replay_is_refused_while_an_execution_waits_or_was_never_dispatched(
    app: Client,
    destination: Destination,
) -> None:
    await create_trigger(app, id="held", destination={"url": destination.url("/held")})
    assert (await app.post("/api/triggers/held/pause", headers=AUTH)).status == 200
    pending = await send(app, "held")
    await wait_until(app, pending, ("pending",))
    await create_trigger(app, id="kept")  # no destination: recorded
    recorded = await send(app, "kept")
    await wait_until(app, recorded, ("recorded",))
    for execution_id in (pending, recorded):
        response = await replay(app, execution_id)
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "replay_not_allowed"


async def test_a_second_replay_within_the_interval_is_rate_limited(
    app: Client,
    destination: Destination,
) -> None:
    destination.script("/t", Reply(400))
    url = destination.url("/t")
    await create_trigger(app, id="t", destination={"url": url}, retry=FAST)
    execution_id = await send(app, "t")
    await wait_until(app, execution_id)
    assert (await replay(app, execution_id)).status == 202
    assert (await wait_until(app, execution_id))["status"] == "dead_lettered"
    response = await replay(app, execution_id)
    assert response.status == 429
    assert (await response.json())["error"]["code"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 60


async def test_concurrent_replays_of_one_execution_accept_exactly_one(
    app: Client,
    destination: Destination,
) -> None:
    execution_id = await dead_letter(app, destination)
    responses = await asyncio.gather(*(replay(app, execution_id) for _ in range(5)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [202, 409, 409, 409, 409]
    row = await wait_until(app, execution_id)
    assert row["replay_count"] == 1 and types(row).count("execution.replay_requested") == 1


async def test_bulk_replay_counts_then_replays_each_dead_letter_once(
    app: Client,
    destination: Destination,
) -> None:
    ids = [await dead_letter(app, destination) for _ in range(3)]
    assert await (await bulk(app, trigger_id="t", dry_run=True)).json() == {"would_replay": 3}
    for limit in (2, 2.0):  # 2.0: an integer to JSON Schema
        assert await (await bulk(app, trigger_id="t", dry_run=True, limit=limit)).json() == {
            "would_replay": 2
        }
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert await (await bulk(app, trigger_id="t", dry_run=True, since=future)).json() == {
        "would_replay": 0
    }
    response = await bulk(app, trigger_id="t")
    assert response.status == 202
    answer = await response.json()
    assert answer["replayed"] == 3 and answer["bulk_id"]
    for execution_id in ids:
        row = await wait_until(app, execution_id)
        assert (row["status"], row["replay_count"]) == ("succeeded", 1)
        requested = [e for e in row["events"] if e["type"] == "execution.replay_requested"]
        assert [e["data"]["bulk_id"] for e in requested] == [answer["bulk_id"]]
        assert destination.count(execution_id) == 2
    assert (await (await bulk(app, trigger_id="t")).json())["replayed"] == 0


async def test_bulk_replay_refuses_bad_requests(app: Client) -> None:
    await create_trigger(app, id="t")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"trigger_id": "nope"}, 404, "trigger_not_found"),
        ({}, 400, "invalid_replay"),
        ({"trigger_id": "t", "status": "pending"}, 400, "invalid_replay"),
        ({"trigger_id": "t", "limit": 0}, 400, "invalid_replay"),
        ({"trigger_id": "t", "limit": 1.5}, 400, "invalid_replay"),
        ({"trigger_id": "t", "limit": True}, 400, "invalid_replay"),
        ({"trigger_id": "t", "since": "yesterday"}, 400, "invalid_replay"),
    ]
    for body, status, code in cases:
        response = await bulk(app, **body)
        assert response.status == status, body
        assert (await response.json())["error"]["code"] == code


async def test_bulk_replay_refuses_unknown_fields_and_replays_nothing(
    app: Client, destination: Destination
) -> None:
    execution_id = await dead_letter(app, destination)
    cases = [({"bogus": 1}, "bogus"), ({"dry_run": False, "trigger": "t"}, "trigger")]
    for body, unknown in cases:
        response = await bulk(app, trigger_id="t", **body)
        assert response.status == 400, body
        error = (await response.json())["error"]
        assert error["code"] == "invalid_replay"
        assert error["message"].startswith(f"field not accepted: {unknown}; accepted: ")
    assert (await wait_until(app, execution_id))["replay_count"] == 0


async def test_a_replay_refuses_a_field_it_does_not_know_and_replays_nothing(
    app: Client, destination: Destination
) -> None:
    execution_id = await dead_letter(app, destination)
    url = f"/api/executions/{execution_id}/replay"
    response = await app.post(url, json={"requested_by": "ops", "reason": "x"}, headers=AUTH)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "invalid_replay"
    assert error["message"].startswith("field not accepted: reason; accepted: requested_by")
    assert (await wait_until(app, execution_id))["replay_count"] == 0
    response = await app.post(url, json={"requested_by": "ops"}, headers=AUTH)
    assert response.status == 202, await response.text()


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HOOKLEDGER_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("HOOKLEDGER_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("HOOKLEDGER_SECRET_KEY", "test-secret-key")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level  # the CLI configures logging for itself


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    await asyncio.to_thread(main, list(argv))
    return orjson.loads(capsys.readouterr().out)


async def test_cli_replays_one_execution_and_a_triggers_dead_letters(
    app: Client,
    destination: Destination,
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, second = [await dead_letter(app, destination) for _ in range(2)]
    assert await run_cli(capsys, "replay", first) == {"execution_id": first, "status": "pending"}
    row = await wait_until(app, first)
    requested = next(e for e in row["events"] if e["type"] == "execution.replay_requested")
    assert requested["data"]["requested_by"].startswith("cli")
    dry = await run_cli(capsys, "replay", "--dead-lettered", "--trigger", "t", "--dry-run")
    assert dry == {"would_replay": 1}
    done = await run_cli(capsys, "replay", "--dead-lettered", "--trigger", "t")
    assert done["replayed"] == 1
    assert (await wait_until(app, second))["status"] == "succeeded"


async def test_replay_is_refused_once_the_trigger_lost_its_destination_or_was_deleted(
    app: Client, destination: Destination
) -> None:
    execution_id = await dead_letter(app, destination)
    patch = await app.patch("/api/triggers/t", json={"destination": None}, headers=AUTH)
    assert patch.status == 200
    for response in (await replay(app, execution_id), await bulk(app, trigger_id="t")):
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "replay_not_allowed"
    assert (await app.delete("/api/triggers/t", headers=AUTH)).status == 204
    assert (await replay(app, execution_id)).status == 409


# The bulk's read of a page (server/replays.py `_page`), told apart from the dispatcher's polls.
BULK_PAGE = "trigger_executions.version \nFROM trigger_executions"


@contextlib.contextmanager
def after_select(
    marker: str, engine: Any, meanwhile: Callable[[], Awaitable[Any]]
) -> Iterator[list[bool]]:
    """`meanwhile()` run right after the next SELECT whose text holds `marker`, before the
    caller's next statement: another request lands between what a replay read and what it
    appends. Yields a list that is emptied once it happened."""
    armed = [True]

    def run(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if armed and statement.lstrip().upper().startswith("SELECT") and marker in statement:
            armed.clear()
            await_only(meanwhile())

    sa.event.listen(engine.sync_engine, "after_cursor_execute", run)
    try:
        yield armed
    finally:
        sa.event.remove(engine.sync_engine, "after_cursor_execute", run)


def repeated_after(app: Client, marker: str) -> contextlib.AbstractContextManager[list[bool]]:
    """The delivery of execution key `k` sent again right after the next SELECT holding
    `marker`: its webhook.duplicate lands on the execution's stream meanwhile."""

    async def repeat() -> None:
        headers = {"Content-Type": "application/json", "Idempotency-Key": "k"}
        response = await app.post("/webhooks/t", data='{"order": 7}', headers=headers)
        assert response.status == 200  # a duplicate, on the execution's stream

    return after_select(marker, app.app[SERVICES].engine, repeat)


async def test_a_replay_raced_by_a_repeat_of_its_delivery_still_lands(
    app: Client, destination: Destination
) -> None:
    # A repeat moves the stream's version, not the execution's state: the replay goes on past
    # it, as the dispatcher's claims do, instead of a 409 saying the execution changed.
    execution_id = await dead_letter(app, destination, Idempotency_Key="k")
    with repeated_after(app, "FROM events") as armed:
        response = await replay(app, execution_id)
    assert not armed
    assert response.status == 202, await response.text()
    row = await wait_until(app, execution_id)
    assert (row["status"], row["replay_count"], row["duplicate_count"]) == ("succeeded", 1, 1)


async def test_a_bulk_replay_raced_by_a_repeat_of_a_delivery_still_replays_it(
    app: Client, destination: Destination
) -> None:
    execution_id = await dead_letter(app, destination, Idempotency_Key="k")
    with repeated_after(app, BULK_PAGE) as armed:
        response = await bulk(app, trigger_id="t")
    assert not armed
    assert response.status == 202, await response.text()
    assert (await response.json())["replayed"] == 1
    row = await wait_until(app, execution_id)
    assert (row["status"], row["replay_count"]) == ("succeeded", 1)


async def test_a_bulk_limit_counts_replays_not_rows_taken_over_meanwhile(
    app: Client, destination: Destination
) -> None:
    # The first dead letter is replayed by someone else between the bulk's read and its append:
    # with limit 1, the bulk replays the next one that qualifies, not none.
    first = await dead_letter(app, destination)
    second = await dead_letter(app, destination)

    async def replay_first() -> None:
        assert (await replay(app, first)).status == 202

    with after_select(BULK_PAGE, app.app[SERVICES].engine, replay_first) as armed:
        response = await bulk(app, trigger_id="t", limit=1)
    assert not armed
    assert (await response.json())["replayed"] == 1
    rows = [await wait_until(app, execution_id) for execution_id in (first, second)]
    assert [row["replay_count"] for row in rows] == [1, 1]
