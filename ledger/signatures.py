"""Webhook signature schemes: check a delivery's raw bytes against its trigger's secrets.

Also names the headers that carry signatures or credentials, and redacts them for storage.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

import orjson
from cryptography.exceptions import InvalidSignature as _BadEd25519Signature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger.errors import InvalidSignature

__all__ = ["REDACTED_HEADERS", "SOURCES", "redact_headers", "verify_signature"]

REDACTED_HEADERS: frozenset[str] = frozenset(
    {
        # the signature and token headers of every source
        "x-hub-signature-256",
        "x-hub-signature",
        "stripe-signature",
        "linear-signature",
        "webhook-signature",
        "svix-signature",
        "x-slack-signature",
        "x-telegram-bot-api-secret-token",
        "x-signature-ed25519",
        "apikey",
        "x-signature-256",
        # credentials any sender or proxy may add
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-auth-token",
        "x-gitlab-token",
    }
)

_REDACTED = "[redacted]"
_MAX_HEADER_CHARS = 4096
_MAX_CANDIDATES = 8
_TOLERANCE_S = 300.0
_LINEAR_TOLERANCE_S = 60.0
_HEX = re.compile(r"[0-9a-fA-F]+")
_SECONDS = re.compile(r"[0-9]{1,12}")
_SHA256_SIZE = 32
_ED25519_SIGNATURE_SIZE = 64
_ED25519_KEY_SIZE = 32

_Secrets = tuple[str, ...]
_Headers = Mapping[str, str]
_Verifier = Callable[[_Secrets, _Headers, bytes, float], None]


def verify_signature(
    source: str,
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
) -> None:
    """Return if `body` and `headers` (lower-case names) carry a valid signature
    under any of `secrets`; raise `InvalidSignature` otherwise, whatever the input."""
    verifier = _VERIFIERS.get(source)
    if verifier is None:
        raise InvalidSignature("unknown source")
    verifier(_usable_secrets(secrets), headers, body, time.time() if now is None else now)


def redact_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-case names to values, repeated names joined with ", ", credentials hidden."""
    stored: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        previous = stored.get(key)
        stored[key] = value if previous is None else f"{previous}, {value}"
    for key in REDACTED_HEADERS.intersection(stored):
        stored[key] = _REDACTED
    return stored


def _usable_secrets(secrets: Sequence[str]) -> _Secrets:
    # A bare str is a Sequence[str] too: take it as one secret, not one per character.
    given = (secrets,) if isinstance(secrets, str) else tuple(secrets)
    usable = tuple(secret for secret in given if secret)
    if not usable:
        raise InvalidSignature("no secret configured")
    return usable


def _header(headers: _Headers, name: str) -> str:
    value = headers.get(name)
    if not value:
        raise InvalidSignature(f"missing {name} header")
    if len(value) > _MAX_HEADER_CHARS:
        raise InvalidSignature(f"{name} header too long")
    return value


def _raw(text: str) -> bytes:
    # surrogatepass: a header value may hold any code point, and encoding must not raise.
    return text.encode("utf-8", "surrogatepass")


def _without_prefix(value: str, prefix: str, name: str) -> str:
    if not value.startswith(prefix):
        raise InvalidSignature(f"malformed {name} header")
    return value[len(prefix) :]


def _hex_bytes(value: str, size: int, name: str) -> bytes:
    if len(value) != 2 * size or not _HEX.fullmatch(value):
        raise InvalidSignature(f"malformed {name} header")
    return bytes.fromhex(value)


def _bounded(candidates: list[str], name: str) -> list[str]:
    if len(candidates) > _MAX_CANDIDATES:
        raise InvalidSignature(f"too many signatures in {name} header")
    return candidates


def _seconds(value: str, name: str) -> int:
    if not _SECONDS.fullmatch(value):
        raise InvalidSignature(f"malformed {name}")
    return int(value)


def _check_age(sent_at: float, now: float, tolerance: float) -> None:
    age = now - sent_at
    # Negated comparisons, so that a NaN anywhere fails closed.
    if not age <= tolerance:
        raise InvalidSignature("timestamp too old")
    if not age >= -tolerance:
        raise InvalidSignature("timestamp in the future")


def _match_hmac(keys: Iterable[bytes], message: bytes, candidates: Sequence[bytes]) -> None:
    for key in keys:
        expected = hmac.new(key, message, hashlib.sha256).digest()
        if any(hmac.compare_digest(expected, candidate) for candidate in candidates):
            return
    raise InvalidSignature("signature does not match")


def _hmac_keys(secrets: _Secrets) -> list[bytes]:
    return [_raw(secret) for secret in secrets]


def _verify_sha256_header(
    secrets: _Secrets, headers: _Headers, body: bytes, now: float, *, name: str
) -> None:
    hex_digest = _without_prefix(_header(headers, name), "sha256=", name)
    _match_hmac(_hmac_keys(secrets), body, [_hex_bytes(hex_digest, _SHA256_SIZE, name)])


def _verify_stripe(secrets: _Secrets, headers: _Headers, body: bytes, now: float) -> None:
    sent_at, candidates = _parse_stripe(_header(headers, "stripe-signature"))
    _check_age(_seconds(sent_at, "stripe-signature timestamp"), now, _TOLERANCE_S)
    _match_hmac(_hmac_keys(secrets), sent_at.encode() + b"." + body, candidates)


def _parse_stripe(value: str) -> tuple[str, list[bytes]]:
    name = "stripe-signature"
    timestamps: list[str] = []
    signatures: list[str] = []
    for item in value.split(","):
        scheme, has_value, content = item.strip().partition("=")
        if not has_value:
            raise InvalidSignature(f"malformed {name} header")
        if scheme == "t":
            timestamps.append(content)
        elif scheme == "v1":
            signatures.append(content)
    if len(timestamps) != 1 or not signatures:
        raise InvalidSignature(f"malformed {name} header")
    digests = [_hex_bytes(sig, _SHA256_SIZE, name) for sig in _bounded(signatures, name)]
    return timestamps[0], digests


def _verify_linear(secrets: _Secrets, headers: _Headers, body: bytes, now: float) -> None:
    name = "linear-signature"
    digest = _hex_bytes(_header(headers, name), _SHA256_SIZE, name)
    _match_hmac(_hmac_keys(secrets), body, [digest])
    # Parsed only once the body is authentic; it carries Linear's own replay guard.
    sent_at_ms = _linear_timestamp_ms(body)
    if sent_at_ms is not None:
        _check_age(sent_at_ms / 1000, now, _LINEAR_TOLERANCE_S)


def _linear_timestamp_ms(body: bytes) -> float | None:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or "webhookTimestamp" not in payload:
        return None
    sent_at = payload["webhookTimestamp"]
    if isinstance(sent_at, bool) or not isinstance(sent_at, int | float):
        raise InvalidSignature("malformed webhookTimestamp")
    return float(sent_at)


def _verify_standard(secrets: _Secrets, headers: _Headers, body: bytes, now: float) -> None:
    message_id = _standard_header(headers, "id")
    sent_at = _standard_header(headers, "timestamp")
    candidates = _parse_standard(_standard_header(headers, "signature"))
    _check_age(_seconds(sent_at, "webhook-timestamp"), now, _TOLERANCE_S)
    message = b".".join((_raw(message_id), sent_at.encode(), body))
    _match_hmac(_standard_keys(secrets), message, candidates)


def _standard_header(headers: _Headers, suffix: str) -> str:
    # Svix names the same headers svix-*: only accounts that have them white-labelled send
    # webhook-*, so most Svix deliveries carry no webhook-* header at all.
    name, branded = "webhook-" + suffix, "svix-" + suffix
    return _header(headers, branded if name not in headers and branded in headers else name)


def _parse_standard(value: str) -> list[bytes]:
    name = "webhook-signature"
    signatures: list[bytes] = []
    for entry in _bounded(value.split(), name):
        version, has_signature, encoded = entry.partition(",")
        # Other versions (v1a is asymmetric) are not ours to check; skip them.
        if version == "v1" and has_signature:
            signatures.append(_base64(encoded, name))
    if not signatures:
        raise InvalidSignature(f"no v1 signature in {name} header")
    return signatures


def _base64(encoded: str, name: str) -> bytes:
    try:
        return base64.b64decode(encoded, validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII str
        raise InvalidSignature(f"malformed {name} header") from None


def _standard_keys(secrets: _Secrets) -> list[bytes]:
    keys: list[bytes] = []
    for secret in secrets:
        encoded = secret.removeprefix("whsec_")
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except ValueError:
            continue
        if key:
            keys.append(key)
    if not keys:
        raise InvalidSignature("no usable whsec_ secret configured")
    return keys


def _verify_slack(secrets: _Secrets, headers: _Headers, body: bytes, now: float) -> None:
    name = "x-slack-signature"
    sent_at = _header(headers, "x-slack-request-timestamp")
    hex_digest = _without_prefix(_header(headers, name), "v0=", name)
    digest = _hex_bytes(hex_digest, _SHA256_SIZE, name)
    _check_age(_seconds(sent_at, "x-slack-request-timestamp"), now, _TOLERANCE_S)
    _match_hmac(_hmac_keys(secrets), b"v0:" + sent_at.encode() + b":" + body, [digest])


def _verify_token(
    secrets: _Secrets, headers: _Headers, body: bytes, now: float, *, name: str
) -> None:
    presented = _raw(_header(headers, name))
    if not any(hmac.compare_digest(presented, _raw(secret)) for secret in secrets):
        raise InvalidSignature(f"{name} does not match")


def _verify_discord(secrets: _Secrets, headers: _Headers, body: bytes, now: float) -> None:
    name = "x-signature-ed25519"
    sent_at = _header(headers, "x-signature-timestamp")
    signature = _hex_bytes(_header(headers, name), _ED25519_SIGNATURE_SIZE, name)
    message = _raw(sent_at) + body
    for public_key in _discord_keys(secrets):
        try:
            public_key.verify(signature, message)
        except _BadEd25519Signature:
            continue
        return
    raise InvalidSignature("signature does not match")


def _discord_keys(secrets: _Secrets) -> list[Ed25519PublicKey]:
    keys: list[Ed25519PublicKey] = []
    for secret in secrets:
        if len(secret) != 2 * _ED25519_KEY_SIZE or not _HEX.fullmatch(secret):
            continue
        try:
            keys.append(Ed25519PublicKey.from_public_bytes(bytes.fromhex(secret)))
        except ValueError:
            continue
    if not keys:
        raise InvalidSignature("no usable public key configured")
    return keys


_VERIFIERS: dict[str, _Verifier] = {
    "github": partial(_verify_sha256_header, name="x-hub-signature-256"),
    "stripe": _verify_stripe,
    "linear": _verify_linear,
    "standard": _verify_standard,
    "slack": _verify_slack,
    "telegram": partial(_verify_token, name="x-telegram-bot-api-secret-token"),
    "discord": _verify_discord,
    "evolution": partial(_verify_token, name="apikey"),
    "generic": partial(_verify_sha256_header, name="x-signature-256"),
}

SOURCES: frozenset[str] = frozenset(_VERIFIERS)
