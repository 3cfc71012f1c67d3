"""The listener `hookledger serve` runs, over raw sockets: header limits and the header deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from conftest import AUTH
from processes import free_port, start_server

from server.app import make_app
from server.config import Settings
from server.listener import LINGERING_S, start_site

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 3.0


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[int]:
    """An in-process server built as `hookledger serve` builds it; yields its port."""
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'hookledger.db'}",
        admin_token="test-admin-token",
        secret_key="test-secret-key",
        data_dir=tmp_path,
        dispatch=False,
        header_timeout_s=HEADER_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    port = free_port()
    runner = await start_site(make_app(settings), settings, host="127.0.0.1", port=port)
    try:
        yield port
    finally:
        await runner.cleanup()


async def exchange(
    port: int, request: bytes, *, wait_s: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; the status, headers and body it sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), wait_s)
    finally:
        writer.close()
    return parse_response(raw)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def assert_error_shape(body: bytes, code: str) -> None:
    answer = orjson.loads(body)
    assert set(answer) == {"error"}
    assert answer["error"]["code"] == code
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]


def request_with(headers: bytes) -> bytes:
    return b"POST /webhooks/t HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" + headers + b"\r\n{}"


async def test_too_many_headers_is_431_in_the_error_shape(site: int) -> None:
    many = b"".join(b"X-Filler-%d: v\r\n" % i for i in range(200))
    status, headers, body = await exchange(site, request_with(many))
    assert status == 431
    assert headers["content-type"].startswith("application/json")
    assert_error_shape(body, "headers_too_large")


async def test_a_header_too_long_is_431_in_the_error_shape(site: int) -> None:
    status, _, body = await exchange(site, request_with(b"X-Long: " + b"a" * 10_000 + b"\r\n"))
    assert status == 431
    assert_error_shape(body, "headers_too_large")


async def test_a_request_line_too_long_is_4xx_in_the_error_shape(site: int) -> None:
    status, _, body = await exchange(
        site, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert 400 <= status < 500
    assert_error_shape(body, "headers_too_large")


@pytest.mark.parametrize(
    "garbage", [b"\x16\x03\x01\x02\x00\r\n\r\n", b"HELLO\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"]
)
async def test_what_is_not_http_is_400_in_the_error_shape(site: int, garbage: bytes) -> None:
    status, _, body = await exchange(site, garbage)
    assert status == 400
    assert_error_shape(body, "bad_request")


async def test_get_on_the_receiver_is_405_in_the_error_shape(site: int) -> None:
    status, headers, body = await exchange(
        site, b"GET /webhooks/t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 405
    assert headers["allow"] == "POST"
    assert_error_shape(body, "method_not_allowed")


@pytest.mark.parametrize(
    ("encoding", "status", "code"),
    [
        # Not a deflate stream: found by the app's decoding (server/codings.py), not the parser.
        (b"deflate", 400, "invalid_content_encoding"),
        # Codings this server does not decode: refused as the receiver refuses them.
        (b"br", 415, "unsupported_media_type"),
        (b"zstd", 415, "unsupported_media_type"),
    ],
)
async def test_an_admin_body_its_coding_cannot_decode_is_refused_in_the_error_shape(
    site: int, encoding: bytes, status: int, code: str
) -> None:
    request = (
        b"POST /api/triggers HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\n"
        b"Content-Type: application/json\r\nContent-Encoding: %s\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    ) % (AUTH["Authorization"].encode(), encoding)
    answer_status, _, body = await exchange(site, request)
    assert answer_status == status
    assert_error_shape(body, code)


async def trickle(port: int, data: bytes, every_s: float) -> tuple[float, bytes]:
    """Send `data` a byte at a time; when the server closes, the seconds it took and its answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    answer = asyncio.create_task(reader.read())
    try:
        for byte in data:
            if answer.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(every_s)
        return time.monotonic() - started, await asyncio.wait_for(answer, 10)
    except (ConnectionError, OSError):
        return time.monotonic() - started, await asyncio.wait_for(answer, 10)
    finally:
        writer.close()


SLOW_HEAD = b"POST /webhooks/t HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 200 + b"\r\n\r\n"


async def test_a_client_trickling_headers_is_cut_off_while_others_are_served(site: int) -> None:
    tricklers = [asyncio.create_task(trickle(site, SLOW_HEAD, 0.05)) for _ in range(50)]
    await asyncio.sleep(0.2)
    # Meanwhile the server answers everyone else at once.
    started = time.monotonic()
    status, _, _ = await exchange(
        site, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200 and time.monotonic() - started < HEADER_TIMEOUT_S
    for elapsed, answer in await asyncio.gather(*tricklers):
        assert HEADER_TIMEOUT_S - 0.1 <= elapsed < HEADER_TIMEOUT_S + 2
        status, _, body = parse_response(answer)
        assert status == 408
        assert_error_shape(body, "request_timeout")


async def test_an_idle_connection_is_closed_after_the_header_timeout(site: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", site)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing said
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 1
    writer.close()


async def test_each_request_on_a_kept_alive_connection_gets_its_own_deadline(site: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", site)
    try:
        for _ in range(3):  # each within the deadline, together well past it
            await asyncio.sleep(HEADER_TIMEOUT_S * 0.6)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(parse_response(head)[1]["content-length"])
            await reader.readexactly(length)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # a head begun, never finished
        answer = await asyncio.wait_for(reader.read(), HEADER_TIMEOUT_S + 2)
        assert parse_response(answer)[0] == 408
    finally:
        writer.close()


async def _create_trigger_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Trigger `t`, made over this kept-alive connection."""
    create = orjson.dumps({"id": "t"})
    writer.write(
        b"POST /api/triggers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: {AUTH['Authorization']}\r\n".encode()
        + b"Content-Length: %d\r\n\r\n" % len(create)
        + create
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 201")
    await reader.readexactly(int(parse_response(head)[1]["content-length"]))


async def test_a_slow_body_is_not_cut_off_by_the_header_deadline(site: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", site)
    try:
        await _create_trigger_on(reader, writer)
        body = b'{"padding": "' + b"x" * 30 + b'"}'
        writer.write(
            b"POST /webhooks/t HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        for i in range(0, len(body), 10):  # the body takes longer than the head's deadline
            writer.write(body[i : i + 10])
            await asyncio.sleep(HEADER_TIMEOUT_S / 3)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 202")
    finally:
        writer.close()


async def test_a_body_that_stops_arriving_is_408_and_nothing_is_recorded(site: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", site)
    try:
        await _create_trigger_on(reader, writer)
        writer.write(
            b"POST /webhooks/t HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"partial": '
        )
        started = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BODY_TIMEOUT_S + 5)
        answered = time.monotonic() - started
        answer = head + await asyncio.wait_for(reader.read(), LINGERING_S + 2)  # then it closes
        closed = time.monotonic() - started
    finally:
        writer.close()
    status, headers, body = parse_response(answer)
    assert status == 408 and headers["connection"] == "close"
    assert_error_shape(body, "request_timeout")
    assert BODY_TIMEOUT_S - 0.1 <= answered < BODY_TIMEOUT_S + 2
    assert closed < BODY_TIMEOUT_S + LINGERING_S + 2
    status, _, body = await exchange(
        site,
        b"GET /api/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Authorization: {AUTH['Authorization']}\r\n\r\n".encode(),
    )
    assert status == 200
    assert [e["type"] for e in orjson.loads(body)["events"]] == ["trigger.registered"]


@pytest.mark.slow
async def test_hookledger_serve_cuts_off_tricklers(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'hookledger.db'}"
    server = await start_server(
        url, tmp_path, "--no-dispatch", env={"HOOKLEDGER_HEADER_TIMEOUT_S": "1"}
    )
    try:
        elapsed, answer = await trickle(server.port, SLOW_HEAD, 0.05)
        status, _, _ = await exchange(
            server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    finally:
        server.stop()
    assert elapsed < 3
    assert parse_response(answer)[0] == 408
    assert status == 200


def test_the_header_timeout_is_a_setting_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOOKLEDGER_HEADER_TIMEOUT_S", "2.5")
    monkeypatch.setenv("HOOKLEDGER_BODY_TIMEOUT_S", "7")
    assert Settings.from_env().header_timeout_s == 2.5
    assert Settings.from_env().body_timeout_s == 7
    assert replace(Settings(), header_timeout_s=3).header_timeout_s == 3
