"""One HTTP attempt to a destination: the request it sends, and the structured outcome it returns.

The request carries the exact body received, its content type, Standard Webhooks headers signed
with the destination secret, and an `Idempotency-Key`, so the receiver can deduplicate too.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
from standardwebhooks.webhooks import Webhook

from ledger.events import JSON

__all__ = ["AttemptResult", "Delivery", "attempt", "signature_headers"]

RESPONSE_CAP_BYTES = (
    64 * 1024
)  # read no more of an answer than this: a destination may stream forever
ERROR_EXCERPT_CHARS = 200
USER_AGENT = "hookledger"


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """What one attempt sends, decoded from the received event and the trigger's destination."""

    url: str
    body: bytes
    content_type: str
    message_id: str  # the `webhook-id`: one per execution, the same for every attempt
    idempotency_key: str
    timeout_s: float
    secret: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        received: JSON,
        destination: JSON,
        *,
        message_id: str,
        key: str,
        secret: str | None,
        headers: dict[str, str],
    ) -> Delivery:
        body = received["body"]
        raw = base64.b64decode(body) if received.get("body_encoding") == "base64" else body.encode()
        return cls(
            url=destination["url"],
            body=raw,
            content_type=received.get("content_type") or "application/octet-stream",
            message_id=message_id,
            idempotency_key=key,
            timeout_s=float(destination.get("timeout_s") or 10.0),
            secret=secret,
            extra_headers=headers,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptResult:
    """What happened: a status code, or the exception that stopped the attempt."""

    status_code: int | None
    error: BaseException | None
    duration_ms: float
    retry_after: str | None = None
    excerpt: str = ""

    @property
    def is_success(self) -> bool:
        return (
            self.error is None and self.status_code is not None and 200 <= self.status_code <= 299
        )

    def describe(self) -> str:
        """A short human description of a failure, for `last_error`."""
        if isinstance(self.error, TimeoutError):
            return "timeout: the destination did not answer in time"
        if self.error is not None:
            return f"{type(self.error).__name__}: {self.error}"[: ERROR_EXCERPT_CHARS * 2]
        text = f"HTTP {self.status_code}"
        return f"{text}: {self.excerpt}" if self.excerpt else text


def signature_headers(delivery: Delivery, now: datetime) -> dict[str, str]:
    """Standard Webhooks headers: `webhook-id`, `webhook-timestamp`, `webhook-signature`."""
    timestamp = str(int(now.timestamp()))
    headers = {"webhook-id": delivery.message_id, "webhook-timestamp": timestamp}
    if delivery.secret:
        headers["webhook-signature"] = _sign(
            delivery.secret, delivery.message_id, now, delivery.body
        )
    return headers


def _sign(secret: str, message_id: str, now: datetime, body: bytes) -> str:
    # A `whsec_` secret is base64 as the scheme says; any other string is taken as raw key bytes.
    key = secret if secret.startswith("whsec_") else secret.encode()
    try:
        return Webhook(key).sign(message_id, now, body.decode("utf-8"))
    except UnicodeDecodeError:
        # The library signs text; a body that is not UTF-8 gets the same HMAC over its bytes.
        raw_key = (
            base64.b64decode(secret.removeprefix("whsec_") + "==") if isinstance(key, str) else key
        )
        signed = f"{message_id}.{int(now.timestamp())}.".encode() + body
        digest = hmac.new(raw_key, signed, hashlib.sha256).digest()
        return "v1," + base64.b64encode(digest).decode()


def _headers(delivery: Delivery, now: datetime) -> dict[str, str]:
    # Ours come last: a configured header never overrides the signature or the key.
    return delivery.extra_headers | {
        "Content-Type": delivery.content_type,
        "User-Agent": USER_AGENT,
        "Idempotency-Key": delivery.idempotency_key,
        **signature_headers(delivery, now),
    }


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    chunks, size = [], 0
    while size < RESPONSE_CAP_BYTES:
        chunk = await response.content.read(RESPONSE_CAP_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def attempt(session: aiohttp.ClientSession, delivery: Delivery) -> AttemptResult:
    """POST the delivery once, within its timeout, never following a redirect."""
    started = time.monotonic()
    headers = _headers(delivery, datetime.now(UTC))
    try:
        async with (
            asyncio.timeout(delivery.timeout_s),
            session.post(
                delivery.url, data=delivery.body, headers=headers, allow_redirects=False
            ) as response,
        ):
            answer = await _read_capped(response)
            status, retry_after = response.status, response.headers.get("Retry-After")
    except Exception as exc:  # noqa: BLE001 - every failure is an outcome, classified by its type
        return AttemptResult(status_code=None, error=exc, duration_ms=_ms(started))
    excerpt = answer[:ERROR_EXCERPT_CHARS].decode("utf-8", "replace").strip()
    return AttemptResult(
        status_code=status,
        error=None,
        duration_ms=_ms(started),
        retry_after=retry_after,
        excerpt=excerpt,
    )


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)
