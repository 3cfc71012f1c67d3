"""Sign test deliveries the way each source's sender does, so that tests can make valid ones.

Written from the senders' documentation, apart from `ledger.signatures`, so one cannot
hide the other's mistake.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["discord_keypair", "sign", "standard_secret"]

_Signer = Callable[[str, bytes, str, Mapping[str, str]], dict[str, str]]


def sign(
    source: str,
    secret: str,
    body: bytes,
    *,
    now: float | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The headers (lower-case names) a sender of `source` sends with `body` at `now`.

    For discord `secret` is the private key in hex (see `discord_keypair`); for standard
    it is a `whsec_` secret (see `standard_secret`). `extra` headers are added last and
    win; an `extra` `webhook-id` is the one signed for standard.
    """
    extra_headers = {name.lower(): value for name, value in (extra or {}).items()}
    sent_at = str(int(time.time() if now is None else now))
    return _SIGNERS[source](secret, body, sent_at, extra_headers) | extra_headers


def discord_keypair() -> tuple[str, str]:
    """A new Ed25519 key pair as (private key hex, public key hex)."""
    private_key = Ed25519PrivateKey.generate()
    public_hex = private_key.public_key().public_bytes_raw().hex()
    return private_key.private_bytes_raw().hex(), public_hex


def standard_secret() -> str:
    """A new Standard Webhooks secret, `whsec_` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def _hex_hmac(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _github(secret: str, body: bytes, sent_at: str, extra: Mapping[str, str]) -> dict[str, str]:
    return {"x-hub-signature-256": "sha256=" + _hex_hmac(secret, body)}


def _generic(secret: str, body: bytes, sent_at: str, extra: Mapping[str, str]) -> dict[str, str]:
    return {"x-signature-256": "sha256=" + _hex_hmac(secret, body)}


def _stripe(secret: str, body: bytes, sent_at: str, extra: Mapping[str, str]) -> dict[str, str]:
    signature = _hex_hmac(secret, f"{sent_at}.".encode() + body)
    return {"stripe-signature": f"t={sent_at},v1={signature}"}


def _linear(secret: str, body: bytes, sent_at: str, extra: Mapping[str, str]) -> dict[str, str]:
    return {"linear-signature": _hex_hmac(secret, body)}


def _standard(secret: str, body: bytes, sent_at: str, extra: Mapping[str, str]) -> dict[str, str]:
    message_id = extra.get("webhook-id") or f"msg_{uuid.uuid4().hex}"
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{sent_at}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": message_id,
        "webhook-timestamp": sent_at,
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


def _slack(secret: str, body: bytes, sent_at: str, extra: Mapping[str, str]) -> dict[str, str]:
    signature = _hex_hmac(secret, f"v0:{sent_at}:".encode() + body)
    return {"x-slack-request-timestamp": sent_at, "x-slack-signature": "v0=" + signature}


def _telegram(secret: str, body: bytes, sent_at: str, extra: Mapping[str, str]) -> dict[str, str]:
    return {"x-telegram-bot-api-secret-token": secret}


def _discord(secret: str, body: bytes, sent_at: str, extra: Mapping[str, str]) -> dict[str, str]:
    private_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    signature = private_key.sign(sent_at.encode() + body)
    return {"x-signature-timestamp": sent_at, "x-signature-ed25519": signature.hex()}


def _evolution(secret: str, body: bytes, sent_at: str, extra: Mapping[str, str]) -> dict[str, str]:
    return {"apikey": secret}


_SIGNERS: dict[str, _Signer] = {
    "github": _github,
    "stripe": _stripe,
    "linear": _linear,
    "standard": _standard,
    "slack": _slack,
    "telegram": _telegram,
    "discord": _discord,
    "evolution": _evolution,
    "generic": _generic,
}
