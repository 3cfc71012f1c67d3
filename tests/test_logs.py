"""Logs: one line per record, whatever newlines or escape sequences a payload carries."""

from __future__ import annotations

import logging

import orjson
import pytest
from aiohttp.test_utils import TestClient
from conftest import create_trigger

from server.logs import JsonFormatter, TextFormatter, fact

HOSTILE = [
    "line\nbreak",
    "carriage\rreturn",
    "\x1b[31mred\x1b[0m and \x1b]0;title\x07",
    "crlf\r\nevt=forged level=error",
    "nul\x00 del\x7f c1\x85 vt\x0b ff\x0c fs\x1c",
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
