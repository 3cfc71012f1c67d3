"""When a failed dispatch is retried, and whether it is worth retrying at all.

The default policy rides out a 24 h outage despite full jitter (a delay can draw 0): the
84 waits of 85 attempts are independent U(0, c_k), c_k = min(3600, 10 * 2**(k-1)), and the
Chernoff bound P(sum <= a) <= e^(λa) * Π (1 - e^(-λ c_k)) / (λ c_k) puts P(sum < 24 h)
below 6e-8 (tests/test_policy.py computes it). The mean span is 38 h, the longest 76 h, about
Stripe's 3 days. Retry-After only ever lengthens a wait, so it cannot break the bound.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from server.addresses import DestinationRefused

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "MAX_ATTEMPTS",
    "MAX_WAIT_S",
    "FailureCategory",
    "RetryPolicy",
    "backoff_ceiling",
    "classify",
    "next_delay",
    "parse_retry_after",
]

FailureCategory = Literal["transient", "permanent"]

MAX_ATTEMPTS = 1000
MAX_WAIT_S = 7 * 24 * 3600.0
_TRANSIENT_STATUSES = frozenset({408, 425, 429})
_DELTA_SECONDS = re.compile(r"-?[0-9]+", re.ASCII)
_PERMANENT_ERRORS = (
    DestinationRefused,
    aiohttp.InvalidURL,
    aiohttp.NonHttpUrlClientError,
    aiohttp.RedirectClientError,
    aiohttp.TooManyRedirects,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how far apart a trigger's dispatch is attempted."""

    max_attempts: int
    base_s: float
    cap_s: float

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            raise ValueError(
                f"retry.max_attempts must be from 1 to {MAX_ATTEMPTS}, got {self.max_attempts}"
            )
        if not 0.0 < self.base_s <= MAX_WAIT_S:  # NaN fails every comparison
            raise ValueError(
                f"retry.base_s must be above 0 and at most {MAX_WAIT_S:g} s, got {self.base_s}"
            )
        if not self.base_s <= self.cap_s <= MAX_WAIT_S:
            raise ValueError(
                f"retry.cap_s must be from base_s ({self.base_s:g}) to {MAX_WAIT_S:g} s,"
                f" got {self.cap_s}"
            )

    @classmethod
    def from_json(cls, raw: object) -> RetryPolicy:
        """Validate a trigger's decoded `retry` JSON; missing fields keep the default."""
        if not isinstance(raw, dict):
            raise ValueError("retry must be an object with max_attempts, base_s, cap_s")
        unknown = sorted(str(key) for key in raw.keys() - {"max_attempts", "base_s", "cap_s"})
        if unknown:
            raise ValueError(f"retry has unknown fields: {', '.join(unknown)}")
        fields = DEFAULT_RETRY_POLICY.to_json() | raw
        return cls(
            max_attempts=_json_int("max_attempts", fields["max_attempts"]),
            base_s=_json_seconds("base_s", fields["base_s"]),
            cap_s=_json_seconds("cap_s", fields["cap_s"]),
        )

    def to_json(self) -> dict[str, int | float]:
        """The JSON-native form kept in trigger events."""
        return {"max_attempts": self.max_attempts, "base_s": self.base_s, "cap_s": self.cap_s}


def json_integer(value: object) -> int | None:
    """`value` as an integer when JSON wrote one: an int, or a number with no fraction (`3.0`,
    an integer to JSON Schema, and what some clients write for every number); else None
    (booleans too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _json_int(name: str, value: object) -> int:
    integer = json_integer(value)
    if integer is not None:
        return integer
    raise ValueError(f"retry.{name} must be an integer, got {_shorten(value)}")


def _json_seconds(name: str, value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int too big for a float: the range check refuses inf
            return math.inf
    raise ValueError(f"retry.{name} must be a number of seconds, got {_shorten(value)}")


def _shorten(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


DEFAULT_RETRY_POLICY = RetryPolicy(max_attempts=85, base_s=10.0, cap_s=3600.0)


def backoff_ceiling(policy: RetryPolicy, attempt: int) -> float:
    """The longest wait after failed attempt number `attempt` (1-based), before jitter."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    # Past ~2**60 the doubling only overflows; the cap has long been reached.
    return min(policy.cap_s, policy.base_s * 2.0 ** min(attempt - 1, 60))


def next_delay(
    policy: RetryPolicy, attempt: int, *, retry_after_s: float | None, rng: random.Random
) -> float:
    """Seconds to wait after failed attempt `attempt`: full jitter, or a longer Retry-After."""
    delay = rng.uniform(0.0, backoff_ceiling(policy, attempt))
    if retry_after_s is not None and retry_after_s > delay:
        # The destination's wish wins when it asks for longer, but never beyond the cap.
        delay = min(policy.cap_s, retry_after_s)
    return delay


def classify(status_code: int | None, error: BaseException | None) -> FailureCategory:
    """Whether a failed attempt may succeed later; from the status code or the exception type.

    Raises ValueError when given no failure (neither an error nor a non-2xx status).
    """
    if error is not None:
        return _classify_error(error)
    if status_code is None or 200 <= status_code <= 299:
        raise ValueError(f"not a failure: status {status_code}, no error")
    return _classify_status(status_code)


def _classify_status(status_code: int) -> FailureCategory:
    # Redirects are never followed, so a 3xx is as final as a 4xx; 1xx and odd codes too.
    if status_code in _TRANSIENT_STATUSES or 500 <= status_code <= 599:
        return "transient"
    return "permanent"


def _classify_error(error: BaseException) -> FailureCategory:
    if _is_caused_by(error, _PERMANENT_ERRORS):
        return "permanent"
    # An answer aiohttp cannot parse comes as a ClientResponseError with aiohttp's own code (400),
    # not one the destination sent: a broken answer, as transient as a dropped connection.
    is_unparsed = _is_caused_by(error, (HttpProcessingError,))
    if isinstance(error, aiohttp.ClientResponseError) and not is_unparsed:
        return _classify_status(error.status)
    # Timeouts, connection errors (OSError, ClientConnectionError), truncated bodies and the
    # unforeseen: a wrong "transient" costs attempts, a wrong "permanent" costs a delivery.
    return "transient"


def _is_caused_by(error: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether `error` or an exception it was explicitly raised from is one of `kinds`."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds a Retry-After header asks to wait (delta-seconds or HTTP-date); None if unusable.

    A negative delay or a date in the past means 0. `now` must be timezone-aware.
    """
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        return max(0.0, float(text))  # float(), not int(): no digit limit, huge means inf
    when = _parse_http_date(text)
    return None if when is None else max(0.0, (when - now).total_seconds())


def _parse_http_date(text: str) -> datetime | None:
    """IMF-fixdate, RFC 850 or asctime (RFC 9110 §5.6.7); a date without a zone is GMT."""
    try:
        when = parsedate_to_datetime(text)
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when
