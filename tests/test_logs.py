"""Logs: one line per record, whatever newlines or escape sequences a payload carries."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest
from aiohttp.test_utils import TestClient
from conftest import create_trigger
from hypothesis import given
from hypothesis import strategies as st

from server.logs import (
    JsonFormatter,
    TextFormatter,
    build_handler,
    fact,
    new_request_id,
    request_id,
)

HOSTILE = [
    "line\nbreak",
    "carriage\rreturn",
    "\x1b[31mred\x1b[0m and \x1b]0;title\x07",
    "crlf\r\nevt=forged level=error",
    "nul\x00 del\x7f c1\x85 vt\x0b ff\x0c fs\x1c",
    "ascii but del\x7f",  # the one character left to escape in an ASCII JSON line
    "unicode\u2028line\u2029separators",
]
FORMATTERS = {
    "text": TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"),
    "json": JsonFormatter(),
}
# Anything a terminal or a line splitter (str.splitlines included) would act on.
UNSAFE = {*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)), "\u2028", "\u2029"}


def assert_one_safe_line(rendered: str) -> None:
    assert rendered.splitlines() == [rendered], repr(rendered)
    assert not UNSAFE & set(rendered), repr(rendered)


def records_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return list(caplog.records)


@pytest.mark.parametrize("name", sorted(FORMATTERS))
@pytest.mark.parametrize("value", HOSTILE)
def test_a_fact_with_hostile_values_is_one_line(
    caplog: pytest.LogCaptureFixture, name: str, value: str
) -> None:
    caplog.set_level(logging.INFO)
    fact(logging.getLogger("hostile"), "webhook_rejected", trigger_id=value, reason=value)
    fact(logging.getLogger("hostile"), "x", **{"k": {"nested": value}})
    for record in records_of(caplog):
        assert_one_safe_line(FORMATTERS[name].format(record))


@pytest.mark.parametrize("name", sorted(FORMATTERS))
@pytest.mark.parametrize("value", HOSTILE)
def test_plain_messages_and_tracebacks_with_hostile_text_are_one_line(
    caplog: pytest.LogCaptureFixture, name: str, value: str
) -> None:
    caplog.set_level(logging.INFO)
    log = logging.getLogger("hostile")
    log.warning("evt=internal_error path=%s", value)
    try:
        raise ValueError(value)
    except ValueError:
        log.exception("evt=failed cause=%s", value)
    for record in records_of(caplog):
        assert_one_safe_line(FORMATTERS[name].format(record))


def test_json_lines_still_carry_the_exact_value(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    for value in HOSTILE:
        fact(logging.getLogger("hostile"), "x", value=value)
    decoded = [orjson.loads(JsonFormatter().format(r)) for r in records_of(caplog)]
    assert [entry["value"] for entry in decoded] == HOSTILE


async def test_hostile_requests_log_one_line_per_record(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[type-arg]
    """Through the real app: a trigger id, keys and bodies carrying escapes, in every record."""
    caplog.set_level(logging.DEBUG)
    await create_trigger(client, id="t")
    await client.post(
        "/webhooks/a%0Ab%0D%1B[2J%E2%80%A8", data="{}", headers={"Content-Type": "application/json"}
    )
    await client.post(
        "/webhooks/t",
        data='{"idempotency_key": "k\\n\\u001b[31m"}',
        headers={"Content-Type": "application/json"},
    )
    await client.post(
        "/webhooks/t",
        data='{"idempotency_key": "ok\u2028key\u0085"}',
        headers={"Content-Type": "application/json"},
    )
    await client.post(
        "/webhooks/t",
        data='{"a": 1, "a": "\\u001b]0;x\\u0007"}',
        headers={"Content-Type": "application/json"},
    )
    records = records_of(caplog)
    assert any("webhook_rejected" in r.getMessage() for r in records)
    for record in records:
        for formatter in FORMATTERS.values():
            assert_one_safe_line(formatter.format(record))


class RecordingStream(io.StringIO):
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[list[int]] = []

    def write(self, text: str) -> int:
        self.writes.append([orjson.loads(line)["n"] for line in text.splitlines()])
        return super().write(text)


Batched = tuple[logging.Logger, logging.Handler, RecordingStream]


@pytest.fixture
def batched() -> Iterator[Batched]:
    stream = RecordingStream()
    handler = build_handler("json", stream)
    log = logging.getLogger("batched")
    log.addHandler(handler)
    log.propagate, log.level = False, logging.INFO
    yield log, handler, stream
    log.removeHandler(handler)


async def test_the_lines_of_one_loop_iteration_are_written_together_when_it_ends(
    batched: Batched,
) -> None:
    log, _, stream = batched
    for n in range(3):
        fact(log, "x", n=n)
    assert stream.writes == []
    await asyncio.sleep(0)  # our task resumes after the callback that writes them
    assert stream.writes == [[0, 1, 2]]


async def test_a_warning_is_written_at_once_after_the_lines_waiting(batched: Batched) -> None:
    log, _, stream = batched
    fact(log, "x", n=0)
    fact(log, "x", logging.WARNING, n=1)
    assert stream.writes == [[0, 1]]
    await asyncio.sleep(0)
    assert stream.writes == [[0, 1]]


def test_without_a_running_loop_each_line_is_written_at_once(batched: Batched) -> None:
    log, _, stream = batched
    fact(log, "x", n=0)
    fact(log, "x", n=1)
    assert stream.writes == [[0], [1]]


def test_lines_a_stopped_loop_left_waiting_are_written_by_flush_or_the_next_line(
    batched: Batched,
) -> None:
    log, handler, stream = batched

    def run_loop_that_stops_after(n: int) -> None:
        loop = asyncio.new_event_loop()

        def log_and_stop() -> None:
            fact(log, "x", n=n)
            loop.stop()  # before the callback that would write the line

        loop.call_soon(log_and_stop)
        loop.run_forever()
        loop.close()

    run_loop_that_stops_after(0)
    assert stream.writes == []
    fact(log, "x", n=1)
    run_loop_that_stops_after(2)
    handler.flush()  # as logging.shutdown does at exit
    assert stream.writes == [[0, 1], [2]]


def test_request_ids_are_16_hex_characters() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(rid) == 16 and set(rid) <= set("0123456789abcdef") for rid in ids)


@given(st.floats(min_value=0, max_value=2**36, allow_nan=False, allow_infinity=False))
def test_json_timestamps_are_what_datetime_isoformat_writes(created: float) -> None:
    formatter = JsonFormatter()
    for moment in (created, created + 0.5, created):  # a new second, then a cached one
        expected = datetime.fromtimestamp(moment, UTC).isoformat()
        assert formatter._timestamp(moment) == expected


class _PassAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return True


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_a_fact_written_directly_is_the_line_its_record_would_make(
    batched: Batched, monkeypatch: pytest.MonkeyPatch, level: int
) -> None:
    log, handler, stream = batched
    monkeypatch.setattr(log, "handlers", [handler])  # without pytest's capturing handlers
    monkeypatch.setattr(time, "time", lambda: 1_790_000_000.123456)  # the LogRecord's clock too
    fields = {"trigger_id": "t 1", "key": "k\n", "n": 3, "ok": True, "when": datetime(2026, 1, 1)}
    token = request_id.set("rid-1")
    try:
        with monkeypatch.context() as direct:
            # The handler is the logger's only one: no LogRecord is made.
            direct.setattr(log, "makeRecord", _no_record)
            fact(log, "idempotent_replay", level, **fields)
        log.addFilter(_PassAll())  # a filter on the way: the record's way
        try:
            fact(log, "idempotent_replay", level, **fields)
        finally:
            log.filters.clear()
    finally:
        request_id.reset(token)
    direct_line, record_line = stream.getvalue().splitlines()
    assert direct_line == record_line
    assert orjson.loads(direct_line)["request_id"] == "rid-1"


def _no_record(*args: object, **kwargs: object) -> logging.LogRecord:
    raise AssertionError("a LogRecord was made")


def test_a_fact_takes_the_records_way_when_another_handler_listens(
    batched: Batched, caplog: pytest.LogCaptureFixture
) -> None:
    log, _, stream = batched
    log.propagate = True  # caplog's handler sits on the root logger
    caplog.set_level(logging.INFO)
    fact(log, "x", n=1)
    assert {r.getMessage() for r in caplog.records} == {"evt=x n=1"}
    assert [orjson.loads(line)["n"] for line in stream.getvalue().splitlines()] == [1]


def test_a_fact_json_cannot_hold_never_raises(batched: Batched) -> None:
    log, _, stream = batched
    fact(log, "x", n=2**70)  # beyond orjson's integers: logging reports it, the caller goes on
    fact(log, "x", n=1)
    assert [orjson.loads(line)["n"] for line in stream.getvalue().splitlines()] == [1]


_JSON_VALUES = st.one_of(
    st.text(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(
    fields=st.dictionaries(
        st.one_of(st.sampled_from(["ts", "msg", "evt", "request_id", "exc", "level"]), st.text()),
        _JSON_VALUES,
        max_size=6,
    ),
    rid=st.one_of(st.none(), st.text()),
    created=st.floats(min_value=0, max_value=2**36, allow_nan=False, allow_infinity=False),
)
def test_a_facts_json_line_holds_its_members_in_order(
    fields: dict[str, object], rid: str | None, created: float
) -> None:
    # Facts whose fields name none of the line's own members are spliced from pieces
    # (JsonFormatter._fact_line); the others are written whole: the same line either way.
    line = JsonFormatter().line(created, "INFO", "server.receiver", "evt=e", "e", fields, rid)
    assert_one_safe_line(line)
    expected: dict[str, object] = {
        "ts": datetime.fromtimestamp(created, UTC).isoformat(),
        "level": "info",
        "logger": "server.receiver",
        "msg": "evt=e",
        "evt": "e",
    }
    expected.update((key, value) for key, value in fields.items() if key not in expected)
    if rid:
        expected["request_id"] = rid
    assert list(orjson.loads(line).items()) == list(expected.items())
