"""Trigger configuration: validation of what an operator asks, and the commands that record it.

Triggers are event-sourced (`trigger.*` events in stream `trigger-{id}`); the `triggers` table is
their projection. Secrets are encrypted before they reach an event and shown in clear only once.
"""

from __future__ import annotations

import base64
import re
import secrets as random_secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from ledger.events import (
    JSON,
    EventData,
    NewEvent,
    TriggerDeleted,
    TriggerPaused,
    TriggerRegistered,
    TriggerResumed,
    TriggerUpdated,
    trigger_stream,
)
from ledger.signatures import SOURCES
from ledger.vault import Vault
from server.addresses import DestinationRefused, check_destination_url, check_header_value
from server.errors import ApiError
from server.policy import RetryPolicy

TRIGGER_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
TRIGGER_ID = re.compile(TRIGGER_ID_PATTERN)
# What each scheme can verify with, as patterns the OpenAPI document states too. A Standard
# Webhooks secret: whsec_ and base64 (padding optional) of 16 to 128 bytes.
_B64 = "[A-Za-z0-9+/]"
STANDARD_SECRET_PATTERN = (
    rf"^whsec_(?:(?:{_B64}{{4}}){{6,42}}|(?:{_B64}{{4}}){{5,42}}"
    rf"(?:{_B64}{{2}}(?:==)?|{_B64}{{3}}=?))$"
)
DISCORD_KEY_PATTERN = r"^[0-9a-fA-F]{64}$"
MAX_SECRET_LENGTH = 1024
DEFAULT_TIMEOUT_S = 10.0
MAX_RATE_PER_S = 1_000_000


CONFIG_FIELDS = frozenset({"destination", "idempotency_key_path", "filter", "retry", "rate_limit"})
CREATE_FIELDS = CONFIG_FIELDS | {"id", "source", "secret", "generate_secret"}
DESTINATION_FIELDS = frozenset({"url", "timeout_s", "secret", "headers"})
RATE_LIMIT_FIELDS = frozenset({"per_s", "burst"})
ROTATE_FIELDS = frozenset({"secret", "grace_s"})
# Fields a GET shows (or a create takes) that a PATCH cannot set, and how each is changed. A
# client that sends a trigger back as it read it learns why, instead of having them ignored.
_ROTATE = "a secret is changed only by POST /api/triggers/{id}/rotate-secret"
_NOT_PATCHABLE = {
    "secret": _ROTATE,
    "generate_secret": _ROTATE,
    "has_secret": _ROTATE,
    "paused": "use POST /api/triggers/{id}/pause or /resume",
    "id": "a trigger's id never changes",
    "source": "a trigger's source never changes: register a new trigger",
    "created_at": "read-only",
    "updated_at": "read-only",
    "counts": "read-only",
}
_SHOWN_NAMES = 5


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_trigger", message)


def _shown(name: str) -> str:
    return name if len(name) <= 40 else name[:37] + "..."


def unknown_fields(
    payload: JSON, accepted: frozenset[str], where: str = "", hints: dict[str, str] | None = None
) -> str | None:
    """Why `payload` is refused for its fields outside `accepted` (each with its hint, if any),
    or None when it has none."""
    unknown = sorted(set(payload) - accepted)
    if not unknown:
        return None
    names = [_shown(name) for name in unknown[:_SHOWN_NAMES]]
    if len(unknown) > _SHOWN_NAMES:
        names.append(f"and {len(unknown) - _SHOWN_NAMES} more")
    hints = hints or {}
    notes = sorted({f"{name}: {hints[name]}" for name in unknown if name in hints})
    plural = "s" if len(unknown) > 1 else ""
    message = f"field{plural} not accepted{where}: {', '.join(names)}"
    if notes:
        message += f" ({'; '.join(notes)})"
    return f"{message}; accepted: {', '.join(sorted(accepted))}"


def refuse_unknown(payload: JSON, accepted: frozenset[str], where: str = "") -> None:
    """A field the server does not know is refused, never dropped: a typo (`filtre`) or a field
    set elsewhere (`secret`, `paused`) would otherwise be answered 2xx and change nothing."""
    if message := unknown_fields(payload, accepted, where, _NOT_PATCHABLE):
        raise invalid(message)


def _text(payload: JSON, name: str, *, limit: int = 255) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise invalid(f"{name} must be a non-empty string of at most {limit} characters")
    return value


def _column_text(payload: JSON, name: str) -> str | None:
    """A string the triggers projection keeps in a column of its own: PostgreSQL text cannot
    hold a NUL, and an event its projector cannot fold would stop every projection for good."""
    value = _text(payload, name)
    if value is not None and "\x00" in value:
        raise invalid(f"{name} must not contain a NUL character")
    return value


def generate_secret(source: str) -> str:
    if source == "discord":
        raise invalid("a discord trigger's secret is the application's public key: give it")
    raw = random_secrets.token_bytes(24)
    return "whsec_" + base64.b64encode(raw).decode() if source == "standard" else raw.hex()


def check_secret(source: str, secret: str) -> None:
    """Refuse a secret its source's scheme could never verify with."""
    if source == "discord" and not re.fullmatch(DISCORD_KEY_PATTERN, secret):
        raise invalid("a discord secret is the application's Ed25519 public key, 64 hex digits")
    if source == "standard" and not re.fullmatch(STANDARD_SECRET_PATTERN, secret):
        raise invalid("a standard (Standard Webhooks) secret is whsec_ and base64 of 16-128 bytes")


def _destination(payload: Any, vault: Vault, *, allow_private: bool) -> JSON | None:
    if payload is None:
        return None
    if not isinstance(payload, dict):
        raise invalid("destination must be an object {url, timeout_s?, secret?, headers?}")
    refuse_unknown(payload, DESTINATION_FIELDS, " in destination")
    url = _text(payload, "url", limit=2048)
    if url is None:
        raise invalid("destination.url is required")
    timeout = payload.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 120:
        raise invalid("destination.timeout_s must be a number of seconds in (0, 120]")
    headers = payload.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise invalid("destination.headers must map names to strings")
    try:
        check_destination_url(url, allow_private=allow_private)
        for name, value in headers.items():
            check_header_value(name, value)
    except DestinationRefused as exc:
        raise invalid(f"destination refused: {exc.reason}") from exc
    secret = _text(payload, "secret", limit=MAX_SECRET_LENGTH)
    return {
        "url": url,
        "timeout_s": float(timeout),
        # Sealed as the secret is: a header's value is most often the destination's own
        # credential (Authorization, X-Api-Key), and the log is read by whoever reads events.
        "sealed_headers": {name: vault.encrypt(value) for name, value in headers.items()},
        "secret_ciphertext": vault.encrypt(secret) if secret else None,
    }


def _retry(value: Any) -> JSON | None:
    if value is None:
        return None
    try:
        policy = RetryPolicy.from_json(value)
    except (ValueError, TypeError) as exc:
        raise invalid(f"retry: {exc}") from exc
    return {"max_attempts": policy.max_attempts, "base_s": policy.base_s, "cap_s": policy.cap_s}


def _number(value: Any, low: float, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        return None
    return float(value)


def _rate_limit(value: Any) -> JSON | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("rate_limit must be an object {per_s, burst?}")
    refuse_unknown(value, RATE_LIMIT_FIELDS, " in rate_limit")
    per_s = _number(value.get("per_s"), 0.001, MAX_RATE_PER_S)
    if per_s is None:
        raise invalid(f"rate_limit.per_s must be a number in [0.001, {MAX_RATE_PER_S}] a second")
    burst = _number(value.get("burst", max(1.0, per_s)), 1, MAX_RATE_PER_S)
    if burst is None:
        raise invalid(f"rate_limit.burst must be a number in [1, {MAX_RATE_PER_S}]")
    return {"per_s": per_s, "burst": burst}


def _filter(value: Any) -> JSON | None:
    if value is not None and not isinstance(value, dict):
        raise invalid("filter must be an object of dotted paths to values")
    # orjson reads JSON nested 1,024 deep but writes only 254 levels: a filter it cannot write
    # into the trigger's event (where it sits a few levels down) is refused here, not failed as
    # the append's 500.
    probe: Any = value
    for _ in range(_FILTER_DEPTH_MARGIN):
        probe = [probe]
    try:
        orjson.dumps(probe)
    except orjson.JSONEncodeError:
        raise invalid(
            f"filter is nested too deep (at most {254 - _FILTER_DEPTH_MARGIN} levels)"
        ) from None
    return value


_FILTER_DEPTH_MARGIN = 14


def config_changes(
    payload: Any, vault: Vault, *, allow_private: bool, accepted: frozenset[str] = CONFIG_FIELDS
) -> JSON:
    """The configuration fields a create or PATCH payload sets, validated and sealed; a field
    outside `accepted` (a PATCH's by default) is refused."""
    if not isinstance(payload, dict):
        raise invalid("the body must be a JSON object")
    refuse_unknown(payload, accepted)
    changes: JSON = {}
    if "destination" in payload:
        changes["destination"] = _destination(
            payload["destination"], vault, allow_private=allow_private
        )
    if "idempotency_key_path" in payload:
        changes["idempotency_key_path"] = _column_text(payload, "idempotency_key_path")
    if "filter" in payload:
        changes["filter"] = _filter(payload["filter"])
    if "retry" in payload:
        changes["retry"] = _retry(payload["retry"])
    if "rate_limit" in payload:
        changes["rate_limit"] = _rate_limit(payload["rate_limit"])
    return changes


def new_config(payload: Any, vault: Vault, *, allow_private: bool) -> tuple[JSON, str | None]:
    """A new trigger's whole configuration (as `trigger.registered` data) and its clear secret."""
    changes = config_changes(payload, vault, allow_private=allow_private, accepted=CREATE_FIELDS)
    trigger_id = payload.get("id")
    if not isinstance(trigger_id, str) or not TRIGGER_ID.fullmatch(trigger_id):
        raise invalid("id must match ^[a-z0-9][a-z0-9_-]{0,63}$")
    source = payload.get("source", "generic")
    if not isinstance(source, str) or source not in SOURCES:
        raise invalid(f"source must be one of {', '.join(sorted(SOURCES))}")
    secret = _text(payload, "secret", limit=MAX_SECRET_LENGTH)
    should_generate = payload.get("generate_secret", False)
    if not isinstance(should_generate, bool):
        raise invalid("generate_secret must be true or false")
    if secret is None and should_generate:
        secret = generate_secret(source)
    if secret is not None:
        check_secret(source, secret)
    config = {
        "id": trigger_id,
        "source": source,
        "secrets": sealed_secrets(vault, secret, [], 0),
        "destination": None,
        "idempotency_key_path": None,
        "filter": None,
        "retry": None,
        "rate_limit": None,
    }
    return config | changes, secret


def sealed_secrets(
    vault: Vault, secret: str | None, previous: list[JSON], grace_s: float
) -> list[JSON]:
    """The stored secret list after setting `secret`: the previous one kept for `grace_s`."""
    if secret is None:
        return []
    kept = []
    if previous and grace_s > 0:
        until = (datetime.now(UTC) + timedelta(seconds=grace_s)).isoformat()
        kept = [{"ciphertext": previous[0]["ciphertext"], "expires_at": until}]
    return [{"ciphertext": vault.encrypt(secret), "expires_at": None}, *kept]


def event_for(trigger_id: str, payload: EventData) -> NewEvent:
    return NewEvent.of(trigger_stream(trigger_id), trigger_id, payload)


def registered(config: JSON) -> TriggerRegistered:
    return TriggerRegistered(**config)


def updated(config: JSON) -> TriggerUpdated:
    return TriggerUpdated(**config)


STATE_EVENTS: dict[str, type[EventData]] = {
    "pause": TriggerPaused,
    "resume": TriggerResumed,
    "delete": TriggerDeleted,
}
