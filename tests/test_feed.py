"""The live feed: SSE backlog then live events, resumption, filters, and `events --follow`."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from conftest import AUTH, create_trigger
from traffic import deliver

from ledger.store import create_engine, read_events
from server.app import make_app
from server.config import Settings


class SseReader:
    """Parses a text/event-stream response into (id, event, data) messages."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def next(self) -> tuple[int, str, dict[str, Any]]:
        fields: dict[str, str] = {}
        while True:
            line = (await self.response.content.readline()).decode()
            if line == "":
                raise EOFError("stream closed")
            line = line.rstrip("\n")
            if line.startswith(":"):
                self.comments.append(line)
            elif line == "":
                if "data" in fields:
                    return int(fields["id"]), fields["event"], orjson.loads(fields["data"])
                fields.clear()
            else:
                name, _, value = line.partition(": ")
                fields[name] = value

    async def take(self, n: int, within_s: float = 20) -> list[tuple[int, str, dict[str, Any]]]:
        async with asyncio.timeout(within_s):
            return [await self.next() for _ in range(n)]


async def open_stream(client: TestClient, query: str = "", **headers: str) -> SseReader:  # type: ignore[type-arg]
    response = await client.get(f"/api/events/stream{query}", headers=AUTH | headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return SseReader(response)


async def logged(settings: Settings) -> list[Any]:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            return await read_events(conn, limit=100_000)
    finally:
        await engine.dispose()


async def test_backlog_then_live_with_the_shape_of_the_events_api(client: TestClient) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    first = await deliver(client, "t", '{"a": 1}')
    reader = await open_stream(client, "?after=0")
    backlog = await reader.take(2)
    assert [(seq, kind) for seq, kind, _ in backlog] == [
        (1, "trigger.registered"),
        (2, "webhook.received"),
    ]
    page = await (await client.get("/api/events?after=0", headers=AUTH)).json()
    assert [data for _, _, data in backlog] == page["events"]
    live = await deliver(client, "t", '{"a": 2}')
    [(seq, kind, data)] = await reader.take(1)
    assert (seq, kind, data["id"]) == (3, "webhook.received", live["event_id"])
    assert data["data"]["body"] == '{"a": 2}' and first["event_id"] != live["event_id"]
    reader.response.close()


async def test_without_after_the_feed_starts_at_the_head(client: TestClient) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    await deliver(client, "t")
    reader = await open_stream(client)
    await deliver(client, "t", '{"new": true}')
    [(seq, _, data)] = await reader.take(1)
    assert seq == 3 and data["data"]["body"] == '{"new": true}'
    reader.response.close()


async def test_last_event_id_resumes_without_loss_or_repeat(client: TestClient) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    for i in range(5):
        await deliver(client, "t", f'{{"i": {i}}}')
    reader = await open_stream(client, "?after=0")
    seen = [seq for seq, _, _ in await reader.take(3)]
    reader.response.close()
    for i in range(5, 8):
        await deliver(client, "t", f'{{"i": {i}}}')
    # A browser reconnects to the same URL and says where it was.
    again = await open_stream(client, "?after=0", **{"Last-Event-ID": str(seen[-1])})
    seen += [seq for seq, _, _ in await again.take(6)]
    assert seen == list(range(1, 10))
    again.response.close()


@pytest.mark.parametrize(
    "last_id", ["\u00b2", "1\u00b2", "-1", "x", "4611686018427387905", "9" * 30]
)
async def test_a_last_event_id_that_is_no_seq_is_a_400(client: TestClient, last_id: str) -> None:  # type: ignore[type-arg]
    # A superscript passed str.isdigit and failed int(): a 500. A number past what a column
    # holds opened the feed, whose every read then failed: "database unavailable", for ever.
    response = await client.get("/api/events/stream", headers=AUTH | {"Last-Event-ID": last_id})
    # Status first, without reading the body: a wrong 200 of the live feed would never end.
    assert response.status == 400
    response.close()


async def test_filters_by_type_and_trigger(client: TestClient) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    await create_trigger(client, id="u")
    reader = await open_stream(
        client, "?after=0&type=webhook.received,webhook.duplicate&trigger_id=u"
    )
    await deliver(client, "t", key="k")
    await deliver(client, "u", key="k")
    await deliver(client, "t", key="k")
    await deliver(client, "u", key="k")
    got = await reader.take(2)
    assert [(seq, kind) for seq, kind, _ in got] == [
        (4, "webhook.received"),
        (6, "webhook.duplicate"),
    ]
    assert all(data["trigger_id"] == "u" for _, _, data in got)
    reader.response.close()


async def test_the_events_page_takes_a_repeated_type_as_the_feed_does(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    await create_trigger(client, id="t")
    await deliver(client, "t", key="k")
    await deliver(client, "t", key="k")
    query = "?after=0&type=trigger.registered&type=webhook.duplicate"
    page = await (await client.get(f"/api/events{query}", headers=AUTH)).json()
    reader = await open_stream(client, query)
    streamed = await reader.take(2)
    reader.response.close()
    assert [e["type"] for e in page["events"]] == ["trigger.registered", "webhook.duplicate"]
    assert page["events"] == [data for _, _, data in streamed]


async def test_two_readers_see_the_exact_log_while_writers_race(
    client: TestClient[Any, Any],
    settings: Settings,
) -> None:
    await create_trigger(client, id="t")
    # A second server process on the same database: its commits reach the feed by polling.
    other = TestClient(TestServer(make_app(settings)))
    await other.start_server()
    try:
        readers = [await open_stream(client, "?after=0") for _ in range(2)]

        async def writer(target: TestClient[Any, Any], n: int, name: str) -> None:
            for i in range(n):
                key = f"{name}-{i % 7}"  # some duplicates too
                await deliver(target, "t", f'{{"w": "{name}", "i": {i}}}', key=key)

        expected = 1 + 5 * 25
        *_, seen_a, seen_b = await asyncio.gather(
            *(writer(client, 25, f"a{j}") for j in range(3)),
            *(writer(other, 25, f"b{j}") for j in range(2)),
            *(reader.take(expected, within_s=60) for reader in readers),
        )
        log = await logged(settings)
        assert len(log) == expected
        for got in (seen_a, seen_b):
            assert got is not None
            assert [(s, d["id"]) for s, _, d in got] == [(e.seq, e.id) for e in log]
            assert [s for s, _, _ in got] == list(range(1, expected + 1))
        for reader in readers:
            reader.response.close()
    finally:
        await other.close()


async def test_events_follow_prints_the_backlog_then_new_events_filtered(
    client: TestClient[Any, Any],
    settings: Settings,
) -> None:
    await create_trigger(client, id="t")
    await create_trigger(client, id="u")
    await deliver(client, "t", '{"n": 1}')
    await deliver(client, "u", '{"n": 2}')
    code = "from server.cli import main; main()"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--database-url",
        settings.database_url,
        "events",
        "--follow",
        "--trigger",
        "u",
        "--type",
        "webhook.received",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            first = orjson.loads(await process.stdout.readline())
            await deliver(client, "t", '{"n": 3}')
            await deliver(client, "u", '{"n": 4}')
            second = orjson.loads(await process.stdout.readline())
    finally:
        process.terminate()
        await process.wait()
    assert (first["seq"], first["data"]["body"]) == (4, '{"n": 2}')
    assert (second["seq"], second["data"]["body"]) == (6, '{"n": 4}')
    page = await (await client.get("/api/events?after=3&limit=1", headers=AUTH)).json()
    assert first == page["events"][0]


async def test_events_follow_stops_quietly_when_its_reader_leaves(
    client: TestClient[Any, Any],
    settings: Settings,
) -> None:
    await create_trigger(client, id="t")
    read_end, write_end = os.pipe()
    code = "from server.cli import main; main()"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--database-url",
        settings.database_url,
        "events",
        "--follow",
        stdout=write_end,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(write_end)
    assert process.stderr is not None
    try:
        async with asyncio.timeout(30):
            # `hookledger events --follow | head -1`: the reader is gone before the next event.
            with os.fdopen(read_end, "rb") as reader:
                await asyncio.to_thread(reader.readline)
            await deliver(client, "t")
            said = (await process.stderr.read()).decode()
            status = await process.wait()
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
    assert "Traceback" not in said and "BrokenPipeError" not in said, said
    assert status == 1
