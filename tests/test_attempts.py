"""The dispatcher's pure parts: what a claim and an outcome append, and how a request is signed."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from ledger.codec import parse_time
from server.attempts import LEASE_EXPIRED, claim_events, outcome_events
from server.delivery import AttemptResult, Delivery, signature_headers
from server.due import Due
from server.policy import RetryPolicy

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=60.0)
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def due(**overrides: Any) -> Due:
    fields: dict[str, Any] = {
        "execution_id": "e1",
        "trigger_id": "t",
        "status": "pending",
        "attempts": 0,
        "version": 1,
        "idempotency_key": None,
        "received_event_id": "r1",
        "trigger_deleted": False,
        "destination": {"url": "http://127.0.0.1:9/", "timeout_s": 5.0},
        "retry": POLICY.to_json(),
    }
    return Due(**(fields | overrides))


def result(
    status: int | None = None, error: BaseException | None = None, **kw: Any
) -> AttemptResult:
    return AttemptResult(status_code=status, error=error, duration_ms=12.5, **kw)


def test_a_claim_starts_the_next_attempt_with_a_lease_past_the_timeout() -> None:
    claim = claim_events(due(attempts=1, status="retrying"), now=NOW, lease_s=30, worker="w")
    [started] = claim.events
    assert claim.attempt == 2 and started.to_data()["attempt"] == 2
    assert parse_time(started.to_data()["lease_until"]) == NOW + timedelta(seconds=35)


def test_taking_over_an_expired_lease_records_the_lost_attempt_first() -> None:
    claim = claim_events(due(status="running", attempts=1), now=NOW, lease_s=30, worker="w")
    lost, started = (e.to_data() for e in claim.events)
    assert (lost["attempt"], lost["error"], lost["retry_at"]) == (1, LEASE_EXPIRED, None)
    assert started["attempt"] == 2 and claim.attempt == 2


def test_a_lost_last_attempt_exhausts_the_policy() -> None:
    claim = claim_events(due(status="running", attempts=3), now=NOW, lease_s=30, worker="w")
    assert claim.attempt is None
    assert [e.TYPE for e in claim.events] == ["execution.failed", "execution.dead_lettered"]
    assert claim.events[-1].to_data()["reason"] == "attempts_exhausted"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [({"trigger_deleted": True}, "trigger_deleted"), ({"destination": None}, "no_destination")],
)
def test_what_cannot_be_sent_is_dead_lettered_without_an_attempt(
    overrides: dict[str, Any], reason: str
) -> None:
    claim = claim_events(due(**overrides), now=NOW, lease_s=30, worker="w")
    assert claim.attempt is None
    [dead] = claim.events
    assert dead.to_data() == {"reason": reason, "error_category": "permanent"}


def outcome(res: AttemptResult, attempt: int = 1) -> list[dict[str, Any]]:
    events = outcome_events(res, attempt=attempt, policy=POLICY, now=NOW, rng=random.Random(7))
    return [{"type": e.TYPE, **e.to_data()} for e in events]


def test_a_2xx_is_one_succeeded_event() -> None:
    [succeeded] = outcome(result(204))
    assert succeeded == {
        "type": "execution.succeeded",
        "attempt": 1,
        "status_code": 204,
        "duration_ms": 12.5,
    }


def test_a_transient_failure_is_retried_within_the_backoff_ceiling() -> None:
    [failed] = outcome(result(503), attempt=2)
    assert failed["error_category"] == "transient" and failed["error"].startswith("HTTP 503")
    assert NOW <= parse_time(failed["retry_at"]) <= NOW + timedelta(seconds=2)


def test_a_longer_retry_after_is_honoured_but_capped() -> None:
    [failed] = outcome(result(429, retry_after="30"))
    assert parse_time(failed["retry_at"]) == NOW + timedelta(seconds=30)
    [capped] = outcome(result(429, retry_after="86400"))
    assert parse_time(capped["retry_at"]) == NOW + timedelta(seconds=60)


def test_a_permanent_failure_is_dead_lettered_at_once() -> None:
    failed, dead = outcome(result(404, excerpt="no such hook"))
    assert (failed["error_category"], failed["retry_at"]) == ("permanent", None)
    assert failed["error"] == "HTTP 404: no such hook"
    assert dead == {
        "type": "execution.dead_lettered",
        "reason": "permanent_error",
        "error_category": "permanent",
    }


def test_the_last_transient_failure_exhausts_the_policy() -> None:
    failed, dead = outcome(result(error=TimeoutError()), attempt=3)
    assert failed["status_code"] is None and "timeout" in failed["error"]
    assert (dead["reason"], dead["error_category"]) == ("attempts_exhausted", "transient")


def delivery(body: bytes, secret: str | None = SECRET) -> Delivery:
    return Delivery(
        url="http://127.0.0.1:9/",
        body=body,
        content_type="text/plain",
        message_id="e1",
        idempotency_key="k",
        timeout_s=5,
        secret=secret,
    )


def test_a_text_body_is_signed_as_standard_webhooks_verifies_it() -> None:
    body = '{"a": "é"}'.encode()
    headers = signature_headers(delivery(body), datetime.now(UTC))
    Webhook(SECRET).verify(body, headers, json_parse=False)


def test_a_body_that_is_not_utf8_gets_the_same_hmac_over_its_bytes() -> None:
    body = b"\xff\xfe raw \x00 bytes"
    headers = signature_headers(delivery(body), NOW)
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"e1.{int(NOW.timestamp())}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"


def test_without_a_secret_there_is_no_signature_but_still_an_id() -> None:
    headers = signature_headers(delivery(b"{}", secret=None), NOW)
    assert headers == {"webhook-id": "e1", "webhook-timestamp": str(int(NOW.timestamp()))}
