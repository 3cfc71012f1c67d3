"""Hostile bodies over HTTP: duplicate keys, non-JSON numbers, broken text, NUL characters, depth,
huge ids, and the server's memory under many oversized uploads at once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from conftest import AUTH, create_trigger
from processes import register, start_server
from test_receiver import deliveries, post

from server.config import Settings


async def assert_invalid_json(response: Any) -> None:
    assert response.status == 400, await response.text()
    assert (await response.json())["error"]["code"] == "invalid_json"


DUPLICATED = [
    b'{"a": 1, "a": 2}',
    b'{"data": {"key": {"id": "x", "id": "y"}}}',
    b'[{"ok": 1}, {"b": [], "c": 0, "b": {}}]',
    # Colons inside strings do not hide a dropped member...
    b'{"a:b": "c:d", "e": 1, "e": 2}',
    # ...nor do colons written as escapes (which the text does not show as ':').
    b'{"a": "x", "a": "\\u003a"}',
    b'{"\\u003A": 1, ":": 2}',
    # Duplicates deeper than orjson can write back (254 levels) are found too.
    b'{"x":' * 300 + b'{"a": 1, "a": 1}' + b"}" * 300,
]


@pytest.mark.parametrize("body", DUPLICATED)
async def test_a_duplicate_key_is_invalid_json(
    client: TestClient, settings: Settings, body: bytes
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    await assert_invalid_json(await post(client, body))
    assert await deliveries(settings) == []


async def test_a_duplicate_key_in_a_form_payload_is_invalid_json(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t", source="github")
    form = "payload=%7B%22a%22%3A1%2C%22a%22%3A2%7D"  # {"a":1,"a":2}
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    await assert_invalid_json(await client.post("/webhooks/t", data=form, headers=headers))
    assert await deliveries(settings) == []


NOT_DUPLICATED = [
    b'{"a": 1, "b": {"a": 1}, "c": [{"a": 1}, {"a": 2}]}',  # same name, different objects
    b'{"t": "12:30:45", "u": "\\\\u003a"}',  # an escaped backslash, then the text u003a
    b'{"\\u003a": 1, "x": "\\u003a\\u003A"}',
    b'{"x":' * 300 + b'{"a": 1, "b": 1}' + b"}" * 300,
]


@pytest.mark.parametrize("body", NOT_DUPLICATED)
async def test_distinct_keys_are_accepted_and_stored_as_received(
    client: TestClient, settings: Settings, body: bytes
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    assert (await post(client, body)).status == 202
    assert (await deliveries(settings))[0].data["body"] == body.decode()


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b"[1e400]",  # a number that is infinite as a double
        b'{"a": "\xff"}',  # invalid UTF-8
        b'{"a": "\xed\xa0\x80"}',  # an encoded lone surrogate
        b'{"a": "\\ud800"}',  # an escaped lone surrogate
        b'{"a": "\\udc00x"}',
        b"[" * 1025 + b"]" * 1025,  # past the parser's depth
        b'{"a": 1} trailing',
        b"",
    ],
)
async def test_hostile_json_is_400_and_stores_nothing(
    client: TestClient, settings: Settings, body: bytes
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    await assert_invalid_json(await post(client, body))
    assert await deliveries(settings) == []


async def test_json_as_deep_as_the_parser_goes_is_stored_as_received(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    body = b"[" * 1024 + b"]" * 1024
    assert (await post(client, body)).status == 202
    assert (await deliveries(settings))[0].data["body"] == body.decode()


@pytest.mark.parametrize(
    ("source", "template"),
    [
        ("generic", '{"idempotency_key": %s}'),
        ("telegram", '{"update_id": %s}'),
        ("stripe", '{"id": %s}'),
    ],
)
async def test_integer_ids_beyond_64_bits_never_collapse_into_one_key(
    client: TestClient,
    settings: Settings,
    source: str,
    template: str,  # type: ignore[type-arg]
) -> None:
    await create_trigger(client, id="t", source=source)
    ids = ["18446744073709551616", "18446744073709551617", "18446744073709551616"]
    # orjson reads the first two as the same float: each is still its own key, by its text.
    statuses = [(await post(client, template % value)).status for value in ids]
    assert statuses == [202, 202, 200]
    events = await deliveries(settings)
    assert [e.idempotency_key for e in events] == ids
    assert [e.type for e in events] == ["webhook.received"] * 2 + ["webhook.duplicate"]


async def test_integer_ids_up_to_64_bits_stay_distinct(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    for value in ("18446744073709551614", "18446744073709551615", "-9223372036854775808"):
        assert (await post(client, f'{{"idempotency_key": {value}}}')).status == 202
    keys = [e.idempotency_key for e in await deliveries(settings)]
    assert keys == ["18446744073709551614", "18446744073709551615", "-9223372036854775808"]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("text/plain", b"a\x00b"), ("application/x-www-form-urlencoded", b"a=\x00&b=1")],
)
async def test_a_keyed_body_with_a_nul_is_deduplicated_and_rebuilt_on_both_backends(
    client: TestClient,  # type: ignore[type-arg]
    settings: Settings,
    content_type: str,
    body: bytes,
) -> None:
    # Text and forms are kept as text: the NUL is a \u0000 escape in the event's JSON text, which
    # PostgreSQL's JSON functions refused to read. A repeat's lookup of its original and the
    # rebuild's bulk statements read fields of that text in the database: both were a 500.
    await create_trigger(client, id="t")
    headers = {"Content-Type": content_type, "Idempotency-Key": "k"}
    statuses = [(await client.post("/webhooks/t", data=body, headers=headers)).status for _ in "ab"]
    assert statuses == [202, 200]
    rebuilt = await client.post("/api/projections/trigger_executions/rebuild", headers=AUTH)
    assert rebuilt.status == 200, await rebuilt.text()
    [row] = (await (await client.get("/api/executions", headers=AUTH)).json())["executions"]
    assert (row["idempotency_key"], row["duplicate_count"]) == ("k", 1)
    assert (await deliveries(settings))[0].data["body"] == body.decode()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
async def test_memory_stays_flat_under_100_concurrent_oversized_uploads(tmp_path: Path) -> None:
    """100 uploads of 4 MiB each (400 MiB in all), against a 64 KiB limit, half of them chunked
    (no Content-Length to refuse up front): the server's peak RSS grows by far less than one
    upload's worth per connection."""
    limit, upload, chunk = 64 * 1024, 4 * 1024 * 1024, 64 * 1024
    url = f"sqlite+aiosqlite:///{tmp_path / 'hookledger.db'}"
    server = await start_server(
        url, tmp_path, "--no-dispatch", env={"HOOKLEDGER_MAX_BODY_BYTES": str(limit)}
    )
    try:
        async with aiohttp.ClientSession() as session:
            await register(session, server, "t")

            async def chunks() -> Any:
                for _ in range(upload // chunk):
                    yield b" " * chunk

            async def send(i: int) -> int | None:
                headers = {"Content-Type": "application/json"}
                if i % 2:
                    data: Any = chunks()
                else:
                    data, headers["Content-Length"] = chunks(), str(upload)
                try:
                    async with session.post(
                        server.url + "/webhooks/t", data=data, headers=headers
                    ) as r:
                        return r.status
                except aiohttp.ClientError:  # the server may close before all was sent
                    return None

            await asyncio.gather(*(send(i) for i in range(4)))  # warm up every code path
            before = _peak_rss_kib(server.process.pid)
            statuses = await asyncio.gather(*(send(i) for i in range(100)))
            after = _peak_rss_kib(server.process.pid)
            async with session.post(
                server.url + "/webhooks/t", data="{}", headers={"Content-Type": "application/json"}
            ) as r:
                assert r.status == 202  # and it still serves
    finally:
        server.stop()
    assert not any(status is not None and status < 400 for status in statuses)
    assert sum(status == 413 for status in statuses) >= 50
    growth_mib = (after - before) / 1024
    # Buffering whole uploads would take 400 MiB; bounded reads take the limit and aiohttp's read
    # buffers per connection (~40 MiB for 100 on CPython 3.11, aiohttp 3.14).
    assert growth_mib < 120, f"peak RSS grew by {growth_mib:.1f} MiB"
