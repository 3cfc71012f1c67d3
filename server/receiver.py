"""The webhook receiver: `POST /webhooks/{trigger_id}`.

Size, content type and signature are checked on the raw bytes before anything is parsed; the
answer goes out only after the delivery is committed to the log.

`receive` is the receiver, whichever lane carries the request: aiohttp's route
(`receive_webhook`, below) or the listener's fast lane (server/fastlane.py), which hands it the
head it parsed and a way to read the body. Both count and log their answers with `count_answer`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass

import orjson
from aiohttp import web

from ledger.bodies import Body, content_kind, decode_body
from ledger.commands import DeliveryOutcome, RecordDelivery
from ledger.events import WebhookReceived, uuid7
from ledger.filters import filter_matches
from ledger.keys import extract_key
from ledger.signatures import redact_headers, verify_signature
from server.catalog import ActiveTrigger
from server.codings import decoded
from server.errors import ApiError
from server.logs import fact, request_id
from server.metrics import Metrics
from server.ratelimit import INGEST_LIMITER, RateLimiter, rate_limited
from server.remote import RemoteMetrics
from server.state import RECEIPT, SERVICES, Services
from server.triggers import TRIGGER_ID

logger = logging.getLogger(__name__)


def _initial_status(trigger: ActiveTrigger, body: Body) -> str:
    if not filter_matches(trigger.filter, body.parsed):
        return "filtered"
    return "pending" if trigger.has_destination else "recorded"


def _check_size(content_length: int | None, limit: int) -> None:
    # A declared length is refused before anything is read; a chunked body is cut off by aiohttp
    # at client_max_size, and a compressed one decoded to that size at most (server/codings.py),
    # so memory stays bounded.
    if content_length is not None and content_length > limit:
        raise ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")


def _check_rate(limiter: RateLimiter, trigger: ActiveTrigger) -> None:
    # After the signature: only authentic deliveries spend tokens, so nobody without the secret
    # can get a trigger's real sender refused.
    limit = trigger.rate_limit
    if limit is not None:
        wait = limiter.wait_s(trigger.id, limit["per_s"], limit["burst"])
        if wait > 0:
            raise rate_limited(wait, f"trigger {trigger.id!r}")


async def within_body_timeout(reading: Awaitable[bytes], timeout_s: float) -> bytes:
    """The body `reading` gives, if it arrives within `timeout_s` (0: no limit); else the 408
    answer, after which the connection is closed. aiohttp bounds a body's size, not the time it
    takes (the listener's deadline covers heads only): a sender trickling its body would hold
    the connection and its memory for ever."""
    if timeout_s <= 0:
        return await reading
    try:
        async with asyncio.timeout(timeout_s):
            return await reading
    except TimeoutError:
        raise ApiError(
            408,
            "request_timeout",
            f"the request body did not arrive within {timeout_s:g} s",
            close=True,
        ) from None


async def _read_body(request: web.Request, timeout_s: float) -> bytes:
    if request.content.is_eof():  # all here already (most): no timer to set
        return await request.read()
    return await within_body_timeout(request.read(), timeout_s)


def _header_text(items: Collection[tuple[str, str]]) -> Collection[tuple[str, str]]:
    """The head's headers, each value text that a key, a JSON text and a database can hold. Both
    lanes decode a head as aiohttp does, as UTF-8 with surrogate escapes: a value that is not
    UTF-8 (HTTP/1.1 took header bytes for Latin-1, and some senders still write it) would come
    with lone surrogates, which none of them can hold (a 500 on every backend). Such a value is
    read as Latin-1 instead: each of its bytes one character, none lost."""
    if all(value.isascii() for _, value in items):  # almost always: nothing to copy
        return items
    return [(name, _latin1_unless_utf8(value)) for name, value in items]


def _latin1_unless_utf8(value: str) -> str:
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("latin-1")
    return value


async def _find_trigger(services: Services, trigger_id: str) -> ActiveTrigger:
    # An id no trigger can have is not looked up: one with a NUL would fail on PostgreSQL.
    trigger = await services.triggers.get(trigger_id) if TRIGGER_ID.fullmatch(trigger_id) else None
    if trigger is None:
        raise ApiError(404, "trigger_not_found", f"no trigger {trigger_id!r}")
    return trigger


def _command(
    trigger: ActiveTrigger,
    items: Iterable[tuple[str, str]],
    headers: dict[str, str],
    raw: bytes,
    body: Body,
    key: str | None,
) -> RecordDelivery:
    received = WebhookReceived(
        execution_id=uuid7(),
        headers=redact_headers(items),
        body=body.text,
        content_type=headers.get("content-type", ""),
        body_sha256=hashlib.sha256(raw).hexdigest(),
        initial_status=_initial_status(trigger, body),
        body_encoding=body.encoding,
    )
    meta = {"request_id": request_id.get(), "source": trigger.source}
    return RecordDelivery.of(
        trigger_id=trigger.id, idempotency_key=key, received=received, meta=meta
    )


def _answer(trigger_id: str, key: str | None, outcome: DeliveryOutcome) -> Answer:
    if not outcome.is_duplicate:
        # DEBUG: a new delivery is in the log itself; only a duplicate's line is a fact to keep.
        fact(
            logger,
            "webhook_accepted",
            logging.DEBUG,
            trigger_id=trigger_id,
            event_id=outcome.event_id,
            execution_id=outcome.execution_id,
        )
        body = {
            "event_id": outcome.event_id,
            "execution_id": outcome.execution_id,
            "duplicate": False,
        }
        return Answer(202, orjson.dumps(body))
    fact(
        logger,
        "idempotent_replay",
        trigger_id=trigger_id,
        idempotency_key=key,
        event_id=outcome.event_id,
        original_event_id=outcome.original_event_id,
        body_matches=outcome.body_matches,
    )
    body = {
        "event_id": outcome.event_id,
        "original_event_id": outcome.original_event_id,
        "execution_id": outcome.execution_id,
        "duplicate": True,
    }
    return Answer(200, orjson.dumps(body), {"Idempotent-Replayed": "true"})


@dataclass(slots=True)
class Head:
    """What the receiver needs of a request's head, from whichever lane parsed it."""

    trigger_id: str  # from the path
    content_length: int | None
    media_type: str  # the Content-Type's media type, lower-case, without parameters
    items: Collection[tuple[str, str]]  # the headers as received, names in any case


@dataclass(slots=True)
class Receipt:
    """One request through the receiver: the trigger once it is found (metrics label only
    triggers that exist: an id taken from the URL is unbounded, so a 404, or a 503 while the
    lookup could not run, has none)."""

    found: str = ""


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes  # JSON
    headers: dict[str, str] | None = None


async def receive(
    services: Services,
    limiter: RateLimiter,
    head: Head,
    read_body: Callable[[], Awaitable[bytes]],
    receipt: Receipt,
) -> Answer:
    """Receive one delivery: check it, append it, answer it once committed. Raises what the
    documented error answers are made of (ApiError, the ledger's errors)."""
    trigger = await _find_trigger(services, head.trigger_id)
    receipt.found = trigger.id
    _check_size(head.content_length, services.settings.max_body_bytes)
    kind = content_kind(head.media_type)
    if kind is None:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{head.media_type!r} is not accepted: send JSON, a form or text/plain",
        )
    items = _header_text(head.items)
    headers = {name.lower(): value for name, value in items}
    limit = services.settings.max_body_bytes
    raw = decoded(await read_body(), headers.get("content-encoding"), limit)
    if trigger.requires_signature:
        verify_signature(trigger.source, trigger.secrets, headers, raw)
    _check_rate(limiter, trigger)
    body = decode_body(kind, raw)
    key = extract_key(
        trigger.source, trigger.idempotency_key_path, headers, body.parsed, body.exact
    )
    # Waited for at most HOOKLEDGER_APPEND_TIMEOUT_S: then a 503 (ledger.appender.Overdue).
    outcome = await services.appender.submit(_command(trigger, items, headers, raw, body, key))
    return _answer(trigger.id, key, outcome)


def count_answer(
    metrics: Metrics | RemoteMetrics, receipt: Receipt, trigger_id: str, status: int, code: str
) -> None:
    """Count an answer of the receiver, and log a rejection with its reason (`code`: the error
    code of a rejection; "duplicate" for a 200). Called with the answer the sender gets, after
    any error became one."""
    if status < 400:
        metrics.count_webhook(receipt.found, "duplicate" if code == "duplicate" else "accepted")
        return
    metrics.count_webhook(receipt.found, "rejected", code)
    fact(logger, "webhook_rejected", trigger_id=trigger_id, status=status, reason=code)


async def receive_webhook(request: web.Request) -> web.Response:
    """The receiver on aiohttp's route; the middleware turns what it raises into the answer and
    counts it (server.monitoring.record_outcome)."""
    services = request.app[SERVICES]
    receipt = request[RECEIPT] = Receipt()
    head = Head(
        trigger_id=request.match_info["trigger_id"],
        content_length=request.content_length,
        media_type=request.content_type,
        items=request.headers.items(),
    )
    timeout_s = services.settings.body_timeout_s
    answer = await receive(
        services, request.app[INGEST_LIMITER], head, lambda: _read_body(request, timeout_s), receipt
    )
    return web.Response(
        status=answer.status,
        body=answer.body,
        content_type="application/json",
        headers=answer.headers,
    )
