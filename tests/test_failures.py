"""A loop's repeated failure is logged as one story: a traceback once, then a line a minute,
then a line when it works again (not a traceback a second for the length of an outage)."""

from __future__ import annotations

import logging

import pytest

from ledger.failures import FailureLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_logs_one_traceback_a_line_a_minute_and_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="outage")
    clock = Clock()
    failures = FailureLog(logging.getLogger("outage"), "round_failed", every_s=60, clock=clock)
    failures.succeeded()  # nothing to say while all is well
    assert caplog.records == []

    for _ in range(150):  # a retry a second for two and a half minutes
        failures.failed(ConnectionRefusedError("connection refused"))
        clock.now += 1
    failures.succeeded()

    records = caplog.records
    assert [r.levelname for r in records] == ["ERROR", "WARNING", "WARNING", "WARNING"]
    assert records[0].exc_info is not None  # the first carries its traceback
    assert all(r.exc_info is None for r in records[1:])
    assert "failures=61 for_s=60" in records[1].getMessage()
    assert "failures=121 for_s=120" in records[2].getMessage()
    assert records[3].getMessage() == "evt=round_failed_recovered failures=150 after_s=150.0"

    caplog.clear()
    failures.failed(TimeoutError())  # a new outage starts a new story, traceback first
    assert [r.exc_info is not None for r in caplog.records] == [True]
