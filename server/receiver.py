"""The webhook receiver: `POST /webhooks/{trigger_id}`.

Size, content type and signature are checked on the raw bytes before anything is parsed; the
answer goes out only after the delivery is committed to the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import orjson
from aiohttp import web

from ledger.bodies import Body, content_kind, decode_body
from ledger.commands import DeliveryOutcome, RecordDelivery
from ledger.events import WebhookReceived, uuid7
from ledger.filters import filter_matches
from ledger.keys import extract_key
from ledger.signatures import redact_headers, verify_signature
from server.catalog import ActiveTrigger
from server.errors import ApiError
from server.logs import fact, request_id
from server.ratelimit import INGEST_LIMITER, rate_limited
from server.state import FOUND_TRIGGER, SERVICES, Services

logger = logging.getLogger(__name__)


def _initial_status(trigger: ActiveTrigger, body: Body) -> str:
    if not filter_matches(trigger.filter, body.parsed):
        return "filtered"
    return "pending" if trigger.has_destination else "recorded"


def _check_size(request: web.Request, limit: int) -> None:
    # A declared length is refused before anything is read; a chunked or compressed body is cut
    # off by aiohttp at client_max_size (after decompression), so memory stays bounded.
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")


def _check_rate(request: web.Request, trigger: ActiveTrigger) -> None:
    # After the signature: only authentic deliveries spend tokens, so nobody without the secret
    # can get a trigger's real sender refused.
    limit = trigger.rate_limit
    if limit is not None:
        limiter = request.app[INGEST_LIMITER]
        wait = limiter.wait_s(trigger.id, limit["per_s"], limit["burst"])
        if wait > 0:
            raise rate_limited(wait, f"trigger {trigger.id!r}")


async def _read_body(request: web.Request, timeout_s: float) -> bytes:
    # aiohttp bounds a body's size, not the time it takes (the listener's deadline covers heads
    # only): a sender trickling its body would hold the connection and its memory for ever.
    if timeout_s <= 0 or request.content.is_eof():  # all here already (most): no timer to set
        return await request.read()
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise ApiError(
            408,
            "request_timeout",
            f"the request body did not arrive within {timeout_s:g} s",
            close=True,
        ) from None


async def _find_trigger(services: Services, trigger_id: str) -> ActiveTrigger:
    trigger = await services.triggers.get(trigger_id)
    if trigger is None:
        raise ApiError(404, "trigger_not_found", f"no trigger {trigger_id!r}")
    return trigger


def _command(
    trigger: ActiveTrigger, request: web.Request, raw: bytes, body: Body, key: str | None
) -> RecordDelivery:
    received = WebhookReceived(
        execution_id=uuid7(),
        headers=redact_headers(request.headers.items()),
        body=body.text,
        content_type=request.headers.get("Content-Type", ""),
        body_sha256=hashlib.sha256(raw).hexdigest(),
        initial_status=_initial_status(trigger, body),
        body_encoding=body.encoding,
    )
    meta = {"request_id": request_id.get(), "source": trigger.source}
    return RecordDelivery(trigger_id=trigger.id, idempotency_key=key, received=received, meta=meta)


def _answer(trigger_id: str, key: str | None, outcome: DeliveryOutcome) -> web.Response:
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
        return web.Response(status=202, body=orjson.dumps(body), content_type="application/json")
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
    return web.Response(
        status=200,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Idempotent-Replayed": "true"},
    )


async def receive_webhook(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    trigger = await _find_trigger(services, request.match_info["trigger_id"])
    request[FOUND_TRIGGER] = trigger.id
    _check_size(request, services.settings.max_body_bytes)
    kind = content_kind(request.content_type)
    if kind is None:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{request.content_type!r} is not accepted: send JSON, a form or text/plain",
        )
    raw = await _read_body(request, services.settings.body_timeout_s)
    headers = {name.lower(): value for name, value in request.headers.items()}
    if trigger.requires_signature:
        verify_signature(trigger.source, trigger.secrets, headers, raw)
    _check_rate(request, trigger)
    body = decode_body(kind, raw)
    key = extract_key(trigger.source, trigger.idempotency_key_path, headers, body.parsed)
    outcome = await services.appender.submit(_command(trigger, request, raw, body, key))
    return _answer(trigger.id, key, outcome)
