"""The webhook receiver over real HTTP, on both backends."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import zlib
from dataclasses import replace
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from conftest import AUTH, MakeClient, create_trigger, serve_app

from ledger.store import create_engine, read_events
from server.app import make_app
from server.config import Settings

# Every test here runs on both ways to the receiver: the listener's fast lane and aiohttp's route.
pytestmark = pytest.mark.lanes

JSON_HEADERS = {"Content-Type": "application/json"}


async def post(client: TestClient, body: bytes | str, *, trigger: str = "t", **headers: str) -> Any:  # type: ignore[type-arg]
    merged = JSON_HEADERS | {k.replace("_", "-"): v for k, v in headers.items()}
    return await client.post(f"/webhooks/{trigger}", data=body, headers=merged)


async def log_events(settings: Settings) -> list[Any]:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            return await read_events(conn, limit=10_000)
    finally:
        await engine.dispose()


async def deliveries(settings: Settings) -> list[Any]:
    return [e for e in await log_events(settings) if e.type.startswith("webhook.")]


async def test_new_delivery_is_accepted_and_stored_exactly(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    body = '{"b": 1,  "a": [1.0, 1e2], "big": 123456789012345678901234567890}'
    response = await post(client, body, Idempotency_Key="k1")
    assert response.status == 202
    answer = await response.json()
    assert answer["duplicate"] is False and answer["event_id"] and answer["execution_id"]
    [event] = await deliveries(settings)
    assert event.type == "webhook.received"
    assert event.id == answer["event_id"]
    assert event.idempotency_key == "k1"
    assert event.data["body"] == body  # byte for byte, never re-serialised
    assert event.data["execution_id"] == answer["execution_id"]
    assert event.data["content_type"] == "application/json"


async def test_repeat_is_a_duplicate_answered_200_and_logged(
    client: TestClient,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,  # type: ignore[type-arg]
) -> None:
    await create_trigger(client, id="t")
    first = await (await post(client, "{}", Idempotency_Key="k")).json()
    caplog.set_level(logging.INFO, logger="server.receiver")
    response = await post(client, "{}", Idempotency_Key="k")
    assert response.status == 200
    assert response.headers["Idempotent-Replayed"] == "true"
    answer = await response.json()
    assert answer["duplicate"] is True
    assert answer["original_event_id"] == first["event_id"]
    assert answer["execution_id"] == first["execution_id"]
    events = await deliveries(settings)
    assert [e.type for e in events] == ["webhook.received", "webhook.duplicate"]
    assert events[1].id == answer["event_id"]
    assert events[1].data["body_matches"] is True
    lines = [r.getMessage() for r in caplog.records if "evt=idempotent_replay" in r.getMessage()]
    assert len(lines) == 1
    for part in (
        "trigger_id=t",
        "idempotency_key=k",
        f"event_id={answer['event_id']}",
        f"original_event_id={first['event_id']}",
    ):
        assert part in lines[0]


async def test_same_key_different_body_keeps_the_evidence(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    await post(client, '{"v": 1}', Idempotency_Key="k")
    response = await post(client, '{"v": 2}', Idempotency_Key="k")
    assert response.status == 200
    received, duplicate = await deliveries(settings)
    assert duplicate.data["body_matches"] is False
    assert duplicate.data["body"] == '{"v": 2}'
    # The rest of the evidence, as the original keeps it (decoded from the delivery's event).
    assert duplicate.data["headers"]["idempotency-key"] == "k"
    assert duplicate.data["headers"].keys() == received.data["headers"].keys()
    assert duplicate.data["body_encoding"] == received.data["body_encoding"] == "utf-8"


async def test_no_key_means_every_delivery_is_new(client: TestClient, settings: Settings) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    answers = [await (await post(client, '{"same": true}')).json() for _ in range(3)]
    assert len({a["execution_id"] for a in answers}) == 3
    events = await deliveries(settings)
    assert [e.type for e in events] == ["webhook.received"] * 3
    assert all(e.idempotency_key is None for e in events)


async def test_racing_duplicates_execute_once(client: TestClient, settings: Settings) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    responses = await asyncio.gather(
        *(post(client, "{}", Idempotency_Key="race") for _ in range(50))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 49 + [202]
    events = await deliveries(settings)
    assert sum(e.type == "webhook.received" for e in events) == 1
    assert sum(e.type == "webhook.duplicate" for e in events) == 49
    assert len({(await r.json())["execution_id"] for r in responses}) == 1


@pytest.mark.parametrize(
    ("config", "headers", "body"),
    [
        ({"idempotency_key_path": "data.key.id"}, {}, '{"data": {"key": {"id": "p1"}}}'),
        ({}, {"Idempotency-Key": "h1"}, "{}"),
        ({}, {"webhook-id": "w1"}, "{}"),
        ({"source": "github"}, {"X-GitHub-Delivery": "g1"}, "{}"),
        ({"source": "stripe"}, {}, '{"id": "evt_1"}'),
        ({"source": "evolution"}, {}, '{"data": {"key": {"id": "wamid"}}}'),
        ({}, {}, '{"messageId": "m1"}'),
        ({}, {}, '{"idempotency_key": 77}'),
    ],
)
async def test_every_key_rule_deduplicates_over_http(
    client: TestClient,
    settings: Settings,
    config: dict[str, Any],
    headers: dict[str, str],
    body: str,  # type: ignore[type-arg]
) -> None:
    await create_trigger(client, id="t", **config)
    merged = JSON_HEADERS | headers
    first = await client.post("/webhooks/t", data=body, headers=merged)
    second = await client.post("/webhooks/t", data=body, headers=merged)
    assert (first.status, second.status) == (202, 200)


@pytest.mark.parametrize("value", ['{"a": 1}', "[1]", "1.5", "true", "null"])
async def test_keys_of_other_json_types_are_ignored(client: TestClient, value: str) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    body = f'{{"idempotency_key": {value}}}'
    statuses = [(await post(client, body)).status for _ in range(2)]
    assert statuses == [202, 202]


@pytest.mark.parametrize("value", ["1e20", "1e300", "18446744073709551616.0", "1E19"])
async def test_a_float_key_however_large_is_ignored_and_the_next_rule_wins(
    client: TestClient, settings: Settings, value: str
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    body = f'{{"idempotency_key": {value}, "messageId": "next"}}'
    statuses = [(await post(client, body)).status for _ in range(2)]
    assert statuses == [202, 200]
    assert [e.idempotency_key for e in await deliveries(settings)] == ["next", "next"]


async def test_an_integer_key_is_its_decimal_text_up_to_255_digits(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    longest = "9" * 255
    assert (await post(client, f'{{"idempotency_key": {longest}}}')).status == 202
    response = await post(client, f'{{"idempotency_key": {longest}9}}')
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_idempotency_key"
    assert [e.idempotency_key for e in await deliveries(settings)] == [longest]


@pytest.mark.parametrize("bad", ["x" * 256, "line\nbreak", "bell\x07"])
async def test_invalid_key_is_400_and_stores_nothing(
    client: TestClient, settings: Settings, bad: str
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    response = await post(client, f'{{"idempotency_key": {json.dumps(bad)}}}')
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_idempotency_key"
    assert await deliveries(settings) == []


async def test_unknown_trigger_is_404(client: TestClient, settings: Settings) -> None:  # type: ignore[type-arg]
    response = await post(client, "{}", trigger="nobody")
    assert response.status == 404
    assert await response.json() == {
        "error": {"code": "trigger_not_found", "message": "no trigger 'nobody'"}
    }


async def test_deleted_trigger_is_404(client: TestClient) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    assert (await client.delete("/api/triggers/t", headers=AUTH)).status == 204
    assert (await post(client, "{}")).status == 404


async def test_body_over_the_limit_is_413_by_content_length(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    body = io.BytesIO(("[" + "1," * (settings.max_body_bytes // 2) + "1]").encode())
    response = await client.post("/webhooks/t", data=body, headers=JSON_HEADERS)
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"
    assert await deliveries(settings) == []


async def test_chunked_body_over_the_limit_is_413(client: TestClient, settings: Settings) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")

    async def chunks() -> Any:
        for _ in range(settings.max_body_bytes // 65536 + 2):
            yield b" " * 65536

    response = await client.post("/webhooks/t", data=chunks(), headers=JSON_HEADERS)
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"
    assert await deliveries(settings) == []


async def test_gzip_body_is_limited_after_decompression(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    bomb = gzip.compress(b"[" + b" " * (settings.max_body_bytes * 4) + b"]")
    response = await client.post(
        "/webhooks/t", data=io.BytesIO(bomb), headers=JSON_HEADERS | {"Content-Encoding": "gzip"}
    )
    assert response.status == 413
    assert await deliveries(settings) == []


def _corrupted(compressed: bytes) -> bytes:
    """`compressed` with a byte of its deflate data flipped: its check no longer matches."""
    middle = len(compressed) // 2
    return compressed[:middle] + bytes([compressed[middle] ^ 0xFF]) + compressed[middle + 1 :]


TRUNCATED_TEXT = b'{"a": "' + bytes(range(65, 91)) * 20 + b'"}'

UNDECODABLE = [
    pytest.param("gzip", b"{}", id="gzip-not-gzip"),
    pytest.param(
        "gzip", _corrupted(gzip.compress(b'{"a": "' + b"x" * 64 + b'"}')), id="gzip-bad-data"
    ),
    pytest.param("deflate", b"\x78\x9c\xff\xff\xff", id="deflate-bad-block"),
    # Cut short: what arrived decodes, but the stream never ends (or its trailer, with the
    # check of the whole, is missing): a part of a body is not the body.
    pytest.param("gzip", gzip.compress(TRUNCATED_TEXT)[:40], id="gzip-truncated"),
    pytest.param("gzip", gzip.compress(TRUNCATED_TEXT)[:-4], id="gzip-trailer-cut"),
    pytest.param("deflate", zlib.compress(TRUNCATED_TEXT)[:40], id="deflate-truncated"),
]


def assert_undecodable(status: int, answer: Any) -> None:
    assert status == 400
    assert set(answer) == {"error"} and set(answer["error"]) == {"code", "message"}
    assert answer["error"]["code"] == "invalid_content_encoding"
    assert "Content-Encoding" in answer["error"]["message"]


@pytest.mark.parametrize(("encoding", "body"), UNDECODABLE)
@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
async def test_a_body_its_content_encoding_cannot_decode_is_400_and_stores_nothing(
    client: TestClient, settings: Settings, encoding: str, body: bytes, content_type: str
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    headers = {"Content-Type": content_type, "Content-Encoding": encoding}
    response = await client.post("/webhooks/t", data=body, headers=headers)
    assert_undecodable(response.status, await response.json())
    assert await deliveries(settings) == []
    # The server goes on serving: the same delivery, encoded properly, is accepted.
    headers["Content-Encoding"] = "gzip"
    response = await client.post("/webhooks/t", data=gzip.compress(b"{}"), headers=headers)
    assert response.status == 202
    assert [e.data["body"] for e in await deliveries(settings)] == ["{}"]


@pytest.mark.parametrize("coding", ["bogus", "x-gzip", "gzip, gzip", "compress"])
@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
async def test_a_content_coding_the_receiver_does_not_decode_is_415_and_stores_nothing(
    client: TestClient, settings: Settings, coding: str, content_type: str
) -> None:  # type: ignore[type-arg]
    # A body left encoded would be refused as invalid JSON, or stored as text nobody can read.
    await create_trigger(client, id="t")
    headers = {"Content-Type": content_type, "Content-Encoding": coding}
    response = await client.post("/webhooks/t", data=b'{"a": 1}', headers=headers)
    assert response.status == 415
    answer = await response.json()
    assert answer["error"]["code"] == "unsupported_media_type"
    assert "Content-Encoding" in answer["error"]["message"]
    assert await deliveries(settings) == []
    for accepted in ("identity", "GZIP"):  # case-insensitive, as codings are
        body = gzip.compress(b'{"a": 1}') if accepted == "GZIP" else b'{"a": 1}'
        headers["Content-Encoding"] = accepted
        response = await client.post("/webhooks/t", data=body, headers=headers)
        assert response.status == 202, await response.text()


@pytest.mark.parametrize(("encoding", "body"), UNDECODABLE)
async def test_an_admin_body_its_content_encoding_cannot_decode_is_400(
    client: TestClient, encoding: str, body: bytes
) -> None:  # type: ignore[type-arg]
    headers = AUTH | JSON_HEADERS | {"Content-Encoding": encoding}
    response = await client.post("/api/triggers", data=body, headers=headers)
    assert_undecodable(response.status, await response.json())
    assert await (await client.get("/api/triggers", headers=AUTH)).json() == {"triggers": []}


@pytest.mark.parametrize(
    "body", [b"{", b'{"a": NaN}', b"\xff\xfe{}", b'{"a": "\xed\xa0\x80"}', b"[" * 2000]
)
async def test_malformed_json_is_400(client: TestClient, settings: Settings, body: bytes) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    response = await post(client, body)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_json"
    assert await deliveries(settings) == []


async def test_json_deeper_than_a_serializer_writes_is_stored_as_received(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    body = "[" * 600 + "]" * 600
    assert (await post(client, body)).status == 202
    assert (await deliveries(settings))[0].data["body"] == body


@pytest.mark.parametrize(
    "content_type", ["image/png", "application/xml", "application/octet-stream"]
)
async def test_unsupported_media_type_is_415(
    client: TestClient, settings: Settings, content_type: str
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    response = await client.post("/webhooks/t", data=b"{}", headers={"Content-Type": content_type})
    assert response.status == 415
    assert (await response.json())["error"]["code"] == "unsupported_media_type"
    assert await deliveries(settings) == []


async def test_vendor_json_form_and_text_are_accepted(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t", source="github")
    form = "payload=%7B%22zen%22%3A%22ok%22%7D"
    headers = {"X-GitHub-Delivery": "d1"}
    r1 = await client.post(
        "/webhooks/t",
        data=form,
        headers=headers | {"Content-Type": "application/x-www-form-urlencoded"},
    )
    r2 = await client.post(
        "/webhooks/t", data="{}", headers={"Content-Type": "application/vnd.api+json"}
    )
    r3 = await client.post(
        "/webhooks/t", data="plain words", headers={"Content-Type": "text/plain; charset=utf-8"}
    )
    assert [r1.status, r2.status, r3.status] == [202, 202, 202]
    bodies = [e.data["body"] for e in await deliveries(settings)]
    assert bodies == [form, "{}", "plain words"]


async def test_only_the_idempotency_constraint_is_absorbed(
    client: TestClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[type-arg]
    """Another integrity error (here a unique index an operator added) is a logged 500."""
    await create_trigger(client, id="t")
    assert (await post(client, "{}")).status == 202
    engine = create_engine(settings.database_url)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "CREATE UNIQUE INDEX one_delivery_only ON events (trigger_id)"
                " WHERE type = 'webhook.received'"
            )
        )
    await engine.dispose()
    caplog.set_level(logging.ERROR)
    response = await post(client, "{}")
    assert response.status == 500
    assert (await response.json())["error"]["code"] == "internal_error"
    assert any(
        "one_delivery_only" in r.getMessage() or "UNIQUE" in r.getMessage() for r in caplog.records
    )
    assert len(await deliveries(settings)) == 1
    # The next duplicate of an existing key is still absorbed, never a 500.
    await post(client, "{}", Idempotency_Key="z")


async def test_admin_api_requires_the_token(client: TestClient) -> None:  # type: ignore[type-arg]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        response = await client.get("/api/triggers", headers=headers)
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"
    assert (await client.get("/api/triggers", headers=AUTH)).status == 200


async def test_an_empty_token_file_locks_the_admin_api_rather_than_opening_it(
    aiohttp_client: MakeClient, settings: Settings, lane: str
) -> None:
    # An empty hookledger.token (truncated, or made by hand) read as the token "": a bare
    # "Bearer" matched it, and anyone could register, delete or replay.
    (settings.data_dir / "hookledger.token").write_text("\n")
    app = make_app(replace(settings, admin_token=None))
    client = await serve_app(aiohttp_client, app, lane)
    for headers in ({"Authorization": "Bearer"}, {"Authorization": "Bearer "}, {}):
        response = await client.get("/api/triggers", headers=headers)
        assert response.status == 401, await response.text()
        error = (await response.json())["error"]
        assert error["code"] == "unauthorized"
    assert "hookledger.token" in error["message"]
    bare = {"Authorization": "Bearer"}
    assert (await client.post("/api/triggers", json={"id": "t"}, headers=bare)).status == 401


async def exchange_raw(client: TestClient, request: bytes) -> tuple[int, bytes]:  # type: ignore[type-arg]
    """Bytes no HTTP client library sends (header values that are not UTF-8): the status and
    body of the answer, on a connection of their own."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def raw_request(method: bytes, path: bytes, headers: bytes, body: bytes = b"") -> bytes:
    return (
        b"%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (method, path, len(body), headers, body)
    )


async def test_header_values_that_are_not_utf8_are_kept_as_latin1(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    # Decoded as aiohttp decodes them (UTF-8, surrogate escapes), they reached the key column and
    # the event's JSON text with lone surrogates, which neither can hold: a 500 on every backend.
    await create_trigger(client, id="t")
    headers = b"Idempotency-Key: k\xe9\r\nX-Note: caf\xe9 \xff\r\nContent-Language: \xe9\r\n"
    answers = [await exchange_raw(client, raw_request(b"POST", b"/webhooks/t", headers, b"{}"))]
    answers.append(await exchange_raw(client, raw_request(b"POST", b"/webhooks/t", headers, b"{}")))
    assert [status for status, _ in answers] == [202, 200], answers
    received = (await deliveries(settings))[0]
    assert received.idempotency_key == "k\u00e9"  # every byte kept, one character each
    assert received.data["headers"]["x-note"] == "caf\u00e9 \u00ff"
    # A C1 control character, read so, is refused as any control character in a key is.
    c1 = raw_request(b"POST", b"/webhooks/t", b"Idempotency-Key: \x85\r\n", b"{}")
    status, body = await exchange_raw(client, c1)
    assert (status, orjson.loads(body)["error"]["code"]) == (400, "invalid_idempotency_key")


async def test_an_admin_token_that_is_not_utf8_is_401(client: TestClient) -> None:  # type: ignore[type-arg]
    # It was encoded to be compared, and a lone surrogate does not encode: a 500.
    request = raw_request(b"GET", b"/api/triggers", b"Authorization: Bearer \xff\r\n")
    status, body = await exchange_raw(client, request)
    assert (status, orjson.loads(body)["error"]["code"]) == (401, "unauthorized")
