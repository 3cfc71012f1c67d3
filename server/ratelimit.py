"""Rate limits: token buckets per trigger (ingestion, off unless a trigger sets `rate_limit`) and
per client address (the admin API). Each process keeps its own buckets.

A refused request gets 429 `rate_limited` with `Retry-After`, the whole seconds until a token is
back, so that senders that honour it come back exactly when they can be served.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from server.errors import ApiError

__all__ = [
    "ADMIN_LIMITER",
    "INGEST_LIMITER",
    "RateLimiter",
    "limit_admin",
    "rate_limited",
]

MAX_BUCKETS = 10_000


@dataclass(slots=True)
class _Bucket:
    per_s: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is back."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.per_s)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.per_s


class RateLimiter:
    """Token buckets by key; at most MAX_BUCKETS are kept (the least recently used go first)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def wait_s(self, key: str, per_s: float, burst: float) -> float:
        """Take a token for `key` at `per_s` tokens a second, up to `burst`: 0 when allowed,
        else the seconds to wait."""
        now = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None or (bucket.per_s, bucket.burst) != (per_s, burst):
            bucket = _Bucket(per_s=per_s, burst=burst, tokens=burst, updated=now)
        self._buckets[key] = bucket  # re-inserted last: dict order is recency order
        if len(self._buckets) > MAX_BUCKETS:
            del self._buckets[next(iter(self._buckets))]
        return bucket.take(now)


def rate_limited(wait_s: float, what: str) -> ApiError:
    retry_after = max(1, math.ceil(wait_s))
    return ApiError(
        429,
        "rate_limited",
        f"too many requests to {what}; retry in {retry_after} s",
        headers={"Retry-After": str(retry_after)},
    )


INGEST_LIMITER: web.AppKey[RateLimiter] = web.AppKey("ingest_limiter", RateLimiter)
ADMIN_LIMITER: web.AppKey[RateLimiter] = web.AppKey("admin_limiter", RateLimiter)


def limit_admin(request: web.Request, per_s: float, burst: float) -> None:
    """Take a token for an /api/ request's client address, or raise 429. Called before the token
    is checked (so guessing it is slow too); `per_s` <= 0 turns the limit off."""
    if per_s > 0:
        wait = request.app[ADMIN_LIMITER].wait_s(request.remote or "", per_s, burst)
        if wait > 0:
            raise rate_limited(wait, "the admin API")
