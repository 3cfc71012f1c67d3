"""Hostile parameters of the admin API, on both backends: a NUL character (which PostgreSQL text
cannot hold) in a path, a query parameter or a body field that reaches a column, and times whose
offset puts them outside what a datetime holds in UTC. Each is a 400 in the documented shape,
never a 500, and nothing it sent reaches the log. Also a dashboard file name longer than a file
system's names: no such file, never an outage."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient
from conftest import AUTH, create_trigger

Client = TestClient[Any, Any]

NUL_IN_QUERY = [
    "/api/events?trigger_id=%00",
    "/api/events?type=%00",
    "/api/events?type=webhook.received,%00",
    "/api/events/stream?trigger_id=%00",
    "/api/events/stream?after=0&type=%00",
    "/api/executions?trigger_id=%00",
    "/api/executions?key=%00",
    "/api/executions?cursor=%00",
    "/api/stats?trigger_id=%00",
    "/api/triggers?%00=1",
]
NUL_IN_PATH = [
    ("GET", "/api/executions/abc%00"),
    ("POST", "/api/executions/abc%00/replay"),
    ("GET", "/api/triggers/a%00"),
    ("PATCH", "/api/triggers/a%00"),
    ("DELETE", "/api/triggers/a%00"),
    ("POST", "/api/triggers/a%00/pause"),
]
OUT_OF_RANGE = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]


async def assert_refused(response: Any, code: str) -> dict[str, Any]:
    # Status first, without reading the body: a wrong 200 of the live feed would never end.
    assert (response.status, response.content_type) == (400, "application/json")
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    return body  # type: ignore[no-any-return]


async def log_types(client: Client) -> list[str]:
    response = await client.get("/api/events?limit=1000", headers=AUTH)
    assert response.status == 200
    return [event["type"] for event in (await response.json())["events"]]


async def delivered(client: Client, trigger_id: str) -> None:
    """A delivery is received and projected: every projection is still folding the log."""
    response = await client.post(f"/webhooks/{trigger_id}", json={"n": 1})
    assert response.status == 202, await response.text()
    execution_id = (await response.json())["execution_id"]
    row = await client.get(f"/api/executions/{execution_id}", headers=AUTH)
    assert row.status == 200 and (await row.json())["status"] == "recorded"


@pytest.mark.parametrize("url", NUL_IN_QUERY)
async def test_a_nul_in_a_query_parameter_is_a_400_invalid_query(client: Client, url: str) -> None:
    await create_trigger(client, id="t")
    await delivered(client, "t")
    body = await assert_refused(await client.get(url, headers=AUTH), "invalid_query")
    assert "NUL" in body["error"]["message"]


@pytest.mark.parametrize(("method", "url"), NUL_IN_PATH)
async def test_a_nul_in_the_path_is_a_400_bad_request(
    client: Client, method: str, url: str
) -> None:
    await create_trigger(client, id="a")
    body = await assert_refused(await client.request(method, url, headers=AUTH), "bad_request")
    assert "NUL" in body["error"]["message"]
    assert await log_types(client) == ["trigger.registered"]


@pytest.mark.parametrize("name", ["a" * 256, "\u00e9" * 128])  # 256 bytes: past 255, in bytes
async def test_a_dashboard_file_name_too_long_for_the_file_system_is_a_404(
    client: Client, name: str
) -> None:
    # The file system answers ENAMETOOLONG (past 255 bytes a name): an OSError, which was taken
    # for the database's and answered 503 storage_unavailable, as if a retry could help.
    assert (await client.get(f"/static/{quote(name)}")).status == 404
    assert (await client.get(f"/static/{quote(name[:-1])}")).status == 404
    assert (await client.get("/static/app.js")).status == 200


async def test_a_webhook_to_a_trigger_id_with_a_nul_is_a_404(client: Client) -> None:
    await create_trigger(client, id="a")
    response = await client.post("/webhooks/a%00", json={"n": 1})
    assert response.status == 404, await response.text()
    assert (await response.json())["error"]["code"] == "trigger_not_found"
    await delivered(client, "a")


async def test_a_bulk_replay_of_a_trigger_id_with_a_nul_is_a_400(client: Client) -> None:
    await create_trigger(client, id="p1", destination={"url": "http://127.0.0.1:9/"})
    response = await client.post("/api/replays", json={"trigger_id": "p1\u0000"}, headers=AUTH)
    await assert_refused(response, "invalid_replay")


@pytest.mark.parametrize("path", ["a\u0000b", "\u0000"])
async def test_a_key_path_with_a_nul_is_refused_before_it_reaches_the_log(
    client: Client, path: str
) -> None:
    # Stored in a column of its own, it would make the triggers projection fail on every try on
    # PostgreSQL, and with it every projection: nothing would be projected again.
    created = await client.post(
        "/api/triggers", json={"id": "k", "idempotency_key_path": path}, headers=AUTH
    )
    await assert_refused(created, "invalid_trigger")
    await create_trigger(client, id="t")
    patched = await client.patch(
        "/api/triggers/t", json={"idempotency_key_path": path}, headers=AUTH
    )
    await assert_refused(patched, "invalid_trigger")
    assert await log_types(client) == ["trigger.registered"]
    await delivered(client, "t")


async def test_nul_in_fields_stored_as_json_text_is_kept_on_both_backends(client: Client) -> None:
    """A filter value is stored inside the trigger's JSON text (escaped): allowed, and folded."""
    await create_trigger(client, id="f", filter={"kind": "a\u0000b"})
    response = await client.post("/webhooks/f", json={"kind": "a\u0000b"})
    assert response.status == 202, await response.text()
    row = await client.get(
        f"/api/executions/{(await response.json())['execution_id']}", headers=AUTH
    )
    assert (await row.json())["status"] == "recorded"
    assert (await (await client.get("/api/triggers/f", headers=AUTH)).json())["filter"] == {
        "kind": "a\u0000b"
    }


@pytest.mark.parametrize("name", ["since", "until"])
@pytest.mark.parametrize("moment", OUT_OF_RANGE)
async def test_a_query_time_out_of_range_in_utc_is_a_400(
    client: Client, name: str, moment: str
) -> None:
    url = f"/api/executions?{name}={moment.replace('+', '%2B')}"
    body = await assert_refused(await client.get(url, headers=AUTH), "invalid_query")
    assert name in body["error"]["message"]


@pytest.mark.parametrize("name", ["since", "until"])
@pytest.mark.parametrize("moment", OUT_OF_RANGE)
async def test_a_bulk_replay_time_out_of_range_in_utc_is_a_400(
    client: Client, name: str, moment: str
) -> None:
    await create_trigger(client, id="p1", destination={"url": "http://127.0.0.1:9/"})
    response = await client.post(
        "/api/replays", json={"trigger_id": "p1", name: moment}, headers=AUTH
    )
    body = await assert_refused(response, "invalid_replay")
    assert name in body["error"]["message"]


async def test_the_cli_says_a_replay_time_out_of_range_is_an_error(
    database_url: str, tmp_path: Path
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "replay",
        "--dead-lettered",
        "--trigger",
        "t",
        "--since",
        OUT_OF_RANGE[0],
        "--database-url",
        database_url,
        cwd=tmp_path,  # where a PostgreSQL database's token and key files go
        env=os.environ | {"HOOKLEDGER_SECRET_KEY": "test-secret-key"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode != 0 and out == b""
    assert "Traceback" not in err.decode()
    assert err.decode().strip().splitlines()[-1] == "error: since must be an ISO-8601 time"
