"""Retry policy, backoff bounds, Retry-After parsing and failure classification."""

from __future__ import annotations

import math
import random
import socket
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from server.addresses import DestinationRefused, make_connector
from server.policy import (
    DEFAULT_RETRY_POLICY,
    RetryPolicy,
    backoff_ceiling,
    classify,
    next_delay,
    parse_retry_after,
)

DAY_S = 24 * 3600.0
NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


# --- the default policy rides out a day ------------------------------------------------------


def default_ceilings() -> list[float]:
    """The jitter ceiling of every wait: after attempts 1 .. max_attempts - 1."""
    return [backoff_ceiling(DEFAULT_RETRY_POLICY, k) for k in range(1, 85)]


def chernoff_lower_tail(ceilings: list[float], total_s: float) -> float:
    """An upper bound on P(sum of independent U(0, c) <= total_s).

    Markov on e^(-λS): P(S <= a) <= e^(λa) * Π E[e^(-λX)], and E[e^(-λX)] = (1 - e^(-λc))/(λc)
    for X ~ U(0, c). Every λ > 0 gives a valid bound, so a coarse grid is enough.
    """

    def log_bound(lam: float) -> float:
        return lam * total_s + sum(math.log(-math.expm1(-lam * c) / (lam * c)) for c in ceilings)

    return math.exp(min(log_bound(i * 1e-6) for i in range(1, 2000)))


def test_chernoff_bound_is_above_the_exact_probability_it_bounds() -> None:
    # The sum of two U(0, c) lies below a <= c with probability a² / 2c² (a triangle).
    c, a = 100.0, 30.0
    assert chernoff_lower_tail([c, c], a) >= a**2 / (2 * c**2)
    assert chernoff_lower_tail([c], a) >= a / c


def test_default_policy_rides_out_a_day_of_outage_but_for_odds_below_one_in_a_million() -> None:
    ceilings = default_ceilings()
    assert len(ceilings) == DEFAULT_RETRY_POLICY.max_attempts - 1
    assert chernoff_lower_tail(ceilings, DAY_S) < 1e-6
    # The expected span is well past a day, the longest one about Stripe's three days.
    assert sum(ceilings) / 2 > 1.5 * DAY_S
    assert 3 * DAY_S <= sum(ceilings) <= 3.5 * DAY_S


def test_default_schedules_drawn_at_random_all_span_more_than_a_day() -> None:
    rng = random.Random(20261128)
    attempts = range(1, DEFAULT_RETRY_POLICY.max_attempts)
    spans = [
        sum(next_delay(DEFAULT_RETRY_POLICY, k, retry_after_s=None, rng=rng) for k in attempts)
        for _ in range(2000)
    ]
    assert min(spans) > DAY_S


def test_every_delay_of_the_default_schedule_stays_within_its_ceiling() -> None:
    rng = random.Random(7)
    for attempt in range(1, DEFAULT_RETRY_POLICY.max_attempts):
        ceiling = backoff_ceiling(DEFAULT_RETRY_POLICY, attempt)
        for _ in range(200):
            delay = next_delay(DEFAULT_RETRY_POLICY, attempt, retry_after_s=None, rng=rng)
            assert 0.0 <= delay <= ceiling


@given(
    attempt=st.integers(min_value=1, max_value=200),
    retry_after_s=st.none() | st.floats(min_value=0, allow_nan=False),
    seed=st.integers(),
)
def test_retry_after_only_lengthens_a_wait_so_the_day_bound_still_holds(
    attempt: int, retry_after_s: float | None, seed: int
) -> None:
    plain = next_delay(DEFAULT_RETRY_POLICY, attempt, retry_after_s=None, rng=random.Random(seed))
    asked = next_delay(
        DEFAULT_RETRY_POLICY, attempt, retry_after_s=retry_after_s, rng=random.Random(seed)
    )
    assert plain <= asked <= DEFAULT_RETRY_POLICY.cap_s


# --- backoff and jitter ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 10.0), (2, 20.0), (3, 40.0), (9, 2560.0), (10, 3600.0), (84, 3600.0), (10**6, 3600.0)],
)
def test_backoff_ceiling_doubles_up_to_the_cap(attempt: int, ceiling: float) -> None:
    assert backoff_ceiling(DEFAULT_RETRY_POLICY, attempt) == ceiling


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempt_numbers_start_at_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="start at 1"):
        backoff_ceiling(DEFAULT_RETRY_POLICY, attempt)


def test_a_longer_retry_after_is_used() -> None:
    policy = RetryPolicy(max_attempts=5, base_s=1.0, cap_s=600.0)
    assert next_delay(policy, 1, retry_after_s=120.0, rng=random.Random(1)) == 120.0


def test_a_retry_after_beyond_the_cap_is_capped() -> None:
    policy = RetryPolicy(max_attempts=5, base_s=1.0, cap_s=600.0)
    assert next_delay(policy, 1, retry_after_s=86400.0, rng=random.Random(1)) == 600.0
    assert next_delay(policy, 1, retry_after_s=math.inf, rng=random.Random(1)) == 600.0


def test_a_shorter_retry_after_leaves_the_jittered_wait() -> None:
    policy = RetryPolicy(max_attempts=5, base_s=100.0, cap_s=600.0)
    expected = random.Random(3).uniform(0.0, 400.0)
    delay = next_delay(policy, 3, retry_after_s=0.0, rng=random.Random(3))
    assert delay == expected


@given(
    base_s=st.floats(min_value=0.001, max_value=3600),
    extra_s=st.floats(min_value=0, max_value=86400),
    attempt=st.integers(min_value=1, max_value=10_000),
    retry_after_s=st.none() | st.floats(min_value=0, allow_nan=False),
    seed=st.integers(),
)
def test_any_delay_lies_between_zero_and_the_cap(
    base_s: float, extra_s: float, attempt: int, retry_after_s: float | None, seed: int
) -> None:
    policy = RetryPolicy(max_attempts=10, base_s=base_s, cap_s=base_s + extra_s)
    delay = next_delay(policy, attempt, retry_after_s=retry_after_s, rng=random.Random(seed))
    assert 0.0 <= delay <= policy.cap_s
    if retry_after_s is None:
        assert delay <= backoff_ceiling(policy, attempt)
    else:
        assert delay >= min(retry_after_s, policy.cap_s)


# --- RetryPolicy validation ------------------------------------------------------------------


def test_policy_from_json_takes_ints_and_floats() -> None:
    policy = RetryPolicy.from_json({"max_attempts": 5, "base_s": 2, "cap_s": 60.5})
    assert policy == RetryPolicy(max_attempts=5, base_s=2.0, cap_s=60.5)
    assert isinstance(policy.base_s, float)
    assert RetryPolicy.from_json(policy.to_json()) == policy


def test_an_integer_written_with_a_zero_fraction_is_an_integer() -> None:
    # JSON Schema's integer (the OpenAPI document's type), and what some clients write.
    policy = RetryPolicy.from_json({"max_attempts": 5.0})
    assert policy.max_attempts == 5 and isinstance(policy.max_attempts, int)
    assert policy.to_json()["max_attempts"] == 5


def test_policy_from_json_keeps_defaults_for_missing_fields() -> None:
    assert RetryPolicy.from_json({}) == DEFAULT_RETRY_POLICY
    policy = RetryPolicy.from_json({"max_attempts": 3})
    assert (policy.base_s, policy.cap_s) == (DEFAULT_RETRY_POLICY.base_s, 3600.0)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ([5, 1, 60], "must be an object"),
        ("retry", "must be an object"),
        ({"max_attempts": 5, "jitter": "full"}, "unknown fields: jitter"),
        ({"max_attempts": True}, "max_attempts must be an integer"),
        ({"max_attempts": 5.5}, "max_attempts must be an integer"),
        ({"max_attempts": math.inf}, "max_attempts must be an integer"),
        ({"max_attempts": "5"}, "max_attempts must be an integer"),
        ({"max_attempts": 0}, "max_attempts must be from 1 to 1000, got 0"),
        ({"max_attempts": 1001}, "max_attempts must be from 1 to 1000"),
        ({"base_s": "10"}, "base_s must be a number of seconds"),
        ({"base_s": None}, "base_s must be a number of seconds"),
        ({"base_s": False}, "base_s must be a number of seconds"),
        ({"base_s": 0}, "base_s must be above 0"),
        ({"base_s": -1}, "base_s must be above 0"),
        ({"base_s": math.nan}, "base_s must be above 0"),
        ({"base_s": math.inf}, "base_s must be above 0"),
        ({"base_s": 10**400}, "base_s must be above 0"),
        ({"base_s": 60, "cap_s": 30}, "cap_s must be from base_s (60)"),
        ({"cap_s": 8 * 86400}, "cap_s must be from base_s"),
        ({"cap_s": math.nan}, "cap_s must be from base_s"),
    ],
)
def test_invalid_retry_json_is_refused_with_a_clear_message(raw: object, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        RetryPolicy.from_json(raw)
    assert words in str(caught.value)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)


@given(st.dictionaries(st.sampled_from(["max_attempts", "base_s", "cap_s"]), JSON_VALUES))
def test_from_json_returns_a_valid_policy_or_raises_value_error(raw: dict[str, object]) -> None:
    try:
        policy = RetryPolicy.from_json(raw)
    except ValueError:
        return
    assert policy.max_attempts >= 1 and 0 < policy.base_s <= policy.cap_s


# --- Retry-After ---------------------------------------------------------------------------


def http_date(when: datetime) -> str:
    return when.strftime("%a, %d %b %Y %H:%M:%S GMT")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("-5", 0.0),
        (http_date(NOW + timedelta(seconds=90)), 90.0),
        (http_date(NOW - timedelta(hours=1)), 0.0),
        ("Sat, 28 Nov 2026 12:02:00 GMT", 120.0),  # IMF-fixdate
        ("Saturday, 28-Nov-26 12:02:00 GMT", 120.0),  # RFC 850
        ("Sat Nov 28 12:02:00 2026", 120.0),  # asctime, which carries no zone: GMT
        ("Sat, 28 Nov 2026 13:02:00 +0100", 120.0),
    ],
)
def test_retry_after_is_read_in_both_forms(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


@pytest.mark.parametrize(
    "value", [None, "", "soon", "1.5", "120s", "0x10", "١٢٠", "Sat, 31 Feb 2026 12:00:00 GMT"]
)
def test_unusable_retry_after_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


def test_a_huge_retry_after_is_infinite_and_next_delay_caps_it() -> None:
    seconds = parse_retry_after("9" * 5000, now=NOW)
    assert seconds == math.inf
    rng = random.Random(0)
    assert next_delay(DEFAULT_RETRY_POLICY, 1, retry_after_s=seconds, rng=rng) == 3600.0


def test_retry_after_needs_an_aware_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_retry_after("5", now=datetime(2026, 11, 28, 12, 0))


@given(st.text())
def test_retry_after_never_raises_for_any_text(value: str) -> None:
    seconds = parse_retry_after(value, now=NOW)
    assert seconds is None or seconds >= 0.0


# --- classification --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 599])
def test_statuses_worth_retrying_are_transient(status: int) -> None:
    assert classify(status, None) == "transient"


@pytest.mark.parametrize(
    "status",
    [400, 401, 403, 404, 405, 409, 410, 413, 415, 422, 451, 499]  # client errors, Gone
    + [300, 301, 302, 303, 304, 307, 308]  # redirects are never followed
    + [100, 101, 103, 0, 600, 999],  # odd codes
)
def test_other_statuses_are_permanent(status: int) -> None:
    assert classify(status, None) == "permanent"


@pytest.mark.parametrize(("status", "error"), [(200, None), (204, None), (None, None)])
def test_classify_refuses_what_is_no_failure(status: int | None, error: None) -> None:
    with pytest.raises(ValueError, match="not a failure"):
        classify(status, error)


def request_info() -> aiohttp.RequestInfo:
    url = URL("http://example.com/hook")
    return aiohttp.RequestInfo(url, "POST", CIMultiDictProxy(CIMultiDict()), url)


def raised_from(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError(),  # asyncio.TimeoutError is this very class since 3.11
        aiohttp.ServerTimeoutError("read timed out"),
        aiohttp.ConnectionTimeoutError(),
        aiohttp.SocketTimeoutError(),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientConnectionError(),
        aiohttp.ClientOSError(104, "connection reset"),
        aiohttp.ClientPayloadError("truncated"),
        ConnectionRefusedError(111, "refused"),
        OSError(113, "no route to host"),
        aiohttp.ClientResponseError(request_info(), (), status=503),
        aiohttp.ClientResponseError(request_info(), (), status=429),
        RuntimeError("HTTP Error 400"),  # the text is never read, only the type
        Exception("404 Not Found"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_errors_that_may_heal_are_transient(error: BaseException) -> None:
    assert classify(None, error) == "transient"


@pytest.mark.parametrize(
    "error",
    [
        DestinationRefused("127.0.0.1 is a loopback address"),
        aiohttp.InvalidURL("not a url"),
        aiohttp.InvalidUrlClientError("2130706433"),
        aiohttp.NonHttpUrlClientError("ftp://example.com"),
        aiohttp.NonHttpUrlRedirectClientError("ftp://example.com"),
        aiohttp.TooManyRedirects(request_info(), (), status=302),
        aiohttp.ClientResponseError(request_info(), (), status=404),
        aiohttp.ClientResponseError(request_info(), (), status=410),
        raised_from(aiohttp.ClientConnectionError(), DestinationRefused("fe80::1")),
        raised_from(RuntimeError("dispatch failed"), aiohttp.InvalidURL("x")),
    ],
    ids=lambda error: type(error).__name__,
)
def test_errors_that_cannot_heal_are_permanent(error: BaseException) -> None:
    assert classify(None, error) == "permanent"


def test_the_error_decides_over_the_status() -> None:
    assert classify(503, DestinationRefused("x")) == "permanent"
    assert classify(200, TimeoutError()) == "transient"


def test_an_error_cycle_does_not_hang_classification() -> None:
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__cause__, second.__cause__ = second, first
    assert classify(None, first) == "transient"


async def test_a_refused_local_connection_is_transient() -> None:
    with socket.socket() as probe:  # a port nobody listens on: bound, then released
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with aiohttp.ClientSession(connector=make_connector(allow_private=True)) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get(f"http://127.0.0.1:{port}/", allow_redirects=False)
    assert classify(None, caught.value) == "transient"
