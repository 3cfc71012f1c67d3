"""Every source's signature scheme: valid, wrong, missing, malformed, stale, rotated, fuzzed."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from signing import discord_keypair, sign, standard_secret
from standardwebhooks import Webhook

from ledger.errors import InvalidSignature
from ledger.signatures import REDACTED_HEADERS, SOURCES, redact_headers, verify_signature

NOW = 1_700_000_000.0
BODY = b'{"id":"evt_1","action":"opened","data":{"n":1}}'
ALL_SOURCES = sorted(SOURCES)
# A shared token authenticates the sender, not the body.
TOKEN_SOURCES = ["evolution", "telegram"]
BODY_SIGNING_SOURCES = sorted(SOURCES - set(TOKEN_SOURCES))
# Timestamp in a header, 300 s either way.
TIMESTAMPED_SOURCES = ["slack", "standard", "stripe"]
SIGNATURE_HEADER = {
    "github": "x-hub-signature-256",
    "stripe": "stripe-signature",
    "linear": "linear-signature",
    "standard": "webhook-signature",
    "slack": "x-slack-signature",
    "telegram": "x-telegram-bot-api-secret-token",
    "discord": "x-signature-ed25519",
    "evolution": "apikey",
    "generic": "x-signature-256",
}
PUBLIC_HEADERS = ["webhook-id", "webhook-timestamp", "x-signature-timestamp"]
PUBLIC_HEADERS += ["x-slack-request-timestamp"]
HEX64 = "ab" * 32


@dataclass(frozen=True, slots=True)
class Key:
    signing: str  # what the sender signs with
    verifying: str  # what the trigger stores


def new_key(source: str) -> Key:
    if source == "discord":
        private_hex, public_hex = discord_keypair()
        return Key(private_hex, public_hex)
    secret = standard_secret() if source == "standard" else f"{source}-{secrets.token_hex(8)}"
    return Key(secret, secret)


NEW = {source: new_key(source) for source in ALL_SOURCES}
OLD = {source: new_key(source) for source in ALL_SOURCES}
REQUIRED_HEADERS = [(source, name) for source in ALL_SOURCES for name in sorted(sign(source, NEW[source].signing, BODY))]


def signed(source: str, body: bytes = BODY, *, key: Key | None = None, now: float = NOW) -> dict[str, str]:
    return sign(source, (key or NEW[source]).signing, body, now=now)


def verify(source: str, headers: dict[str, str], body: bytes = BODY, *, keys: list[Key] | None = None, now: float | None = NOW) -> None:
    secrets_in_use = [key.verifying for key in keys or [NEW[source]]]
    verify_signature(source, secrets_in_use, headers, body, now=now)


def test_sources_are_the_nine_documented_ones() -> None:
    assert set(SIGNATURE_HEADER) == SOURCES


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_valid_signature_is_accepted(source: str) -> None:
    assert verify(source, signed(source)) is None


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_wrong_secret_is_rejected(source: str) -> None:
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(source, signed(source, key=OLD[source]))


@pytest.mark.parametrize(("source", "name"), REQUIRED_HEADERS)
def test_missing_header_is_rejected(source: str, name: str) -> None:
    headers = signed(source)
    del headers[name]
    with pytest.raises(InvalidSignature, match=f"missing {name} header"):
        verify(source, headers)


@pytest.mark.parametrize(("source", "name"), REQUIRED_HEADERS)
def test_empty_header_counts_as_missing(source: str, name: str) -> None:
    with pytest.raises(InvalidSignature, match=f"missing {name} header"):
        verify(source, signed(source) | {name: ""})


@pytest.mark.parametrize(("source", "name"), REQUIRED_HEADERS)
def test_header_over_4_kib_is_rejected(source: str, name: str) -> None:
    with pytest.raises(InvalidSignature, match=f"{name} header too long"):
        verify(source, signed(source) | {name: "a" * 4097})


MALFORMED = [
    ("github", "x-hub-signature-256", "sha1=" + "a" * 40, "malformed"),
    ("github", "x-hub-signature-256", "sha256=" + "g" * 64, "malformed"),
    ("github", "x-hub-signature-256", "sha256=" + "a" * 63, "malformed"),
    ("generic", "x-signature-256", HEX64, "malformed"),
    ("linear", "linear-signature", "sha256=" + HEX64, "malformed"),
    ("stripe", "stripe-signature", f"v1={HEX64}", "malformed"),
    ("stripe", "stripe-signature", "t=1700000000", "malformed"),
    ("stripe", "stripe-signature", f"t=soon,v1={HEX64}", "malformed"),
    ("stripe", "stripe-signature", f"t=-1700000000,v1={HEX64}", "malformed"),
    ("stripe", "stripe-signature", "t=1700000000,v1=xyz", "malformed"),
    ("stripe", "stripe-signature", f"t=1700000000,t=1700000000,v1={HEX64}", "malformed"),
    ("stripe", "stripe-signature", f"t=1700000000,v1={HEX64},", "malformed"),
    ("standard", "webhook-signature", "v1", "no v1 signature"),
    ("standard", "webhook-signature", "v1a,AAAA", "no v1 signature"),
    ("standard", "webhook-signature", "v1,not*base64", "malformed"),
    ("standard", "webhook-signature", "v1,AAAAé", "malformed"),
    ("standard", "webhook-timestamp", "1700000000.5", "malformed webhook-timestamp"),
    ("standard", "webhook-timestamp", "١٧٠٠٠٠٠٠٠٠", "malformed webhook-timestamp"),
    ("slack", "x-slack-signature", f"v1={HEX64}", "malformed"),
    ("slack", "x-slack-request-timestamp", "now", "malformed x-slack-request-timestamp"),
    ("discord", "x-signature-ed25519", "ab", "malformed"),
    ("discord", "x-signature-ed25519", "zz" * 64, "malformed"),
]


@pytest.mark.parametrize(("source", "name", "value", "reason"), MALFORMED)
def test_malformed_header_is_rejected(source: str, name: str, value: str, reason: str) -> None:
    with pytest.raises(InvalidSignature, match=reason):
        verify(source, signed(source) | {name: value})


@pytest.mark.parametrize("source", TIMESTAMPED_SOURCES)
@pytest.mark.parametrize("offset", [-300, -299, 0, 299, 300])
def test_timestamp_within_tolerance_is_accepted(source: str, offset: int) -> None:
    assert verify(source, signed(source, now=NOW + offset)) is None


@pytest.mark.parametrize("source", TIMESTAMPED_SOURCES)
def test_stale_timestamp_is_rejected(source: str) -> None:
    with pytest.raises(InvalidSignature, match="too old"):
        verify(source, signed(source, now=NOW - 301))


@pytest.mark.parametrize("source", TIMESTAMPED_SOURCES)
def test_future_timestamp_is_rejected(source: str) -> None:
    with pytest.raises(InvalidSignature, match="in the future"):
        verify(source, signed(source, now=NOW + 301))


@pytest.mark.parametrize("source", TIMESTAMPED_SOURCES)
def test_nan_clock_fails_closed(source: str) -> None:
    with pytest.raises(InvalidSignature, match="timestamp"):
        verify(source, signed(source), now=float("nan"))


def linear_body(sent_at_ms: object) -> bytes:
    return orjson.dumps({"action": "create", "webhookTimestamp": sent_at_ms})


@pytest.mark.parametrize("offset", [-60, -59, 0, 59, 60])
def test_linear_body_timestamp_within_60_s_is_accepted(offset: int) -> None:
    body = linear_body(int((NOW + offset) * 1000))
    assert verify("linear", signed("linear", body), body) is None


@pytest.mark.parametrize(("offset", "reason"), [(-61, "too old"), (61, "in the future")])
def test_linear_body_timestamp_beyond_60_s_is_rejected(offset: int, reason: str) -> None:
    body = linear_body(int((NOW + offset) * 1000))
    with pytest.raises(InvalidSignature, match=reason):
        verify("linear", signed("linear", body), body)


@pytest.mark.parametrize("sent_at", ["yesterday", True, None, [NOW * 1000]])
def test_linear_malformed_body_timestamp_is_rejected(sent_at: object) -> None:
    body = linear_body(sent_at)
    with pytest.raises(InvalidSignature, match="malformed webhookTimestamp"):
        verify("linear", signed("linear", body), body)


@pytest.mark.parametrize("body", [b"plain text", b"[1, 2]", b"\xff\xfe"])
def test_linear_body_without_timestamp_needs_only_the_signature(body: bytes) -> None:
    assert verify("linear", signed("linear", body), body) is None


def wrong_stripe_signature() -> str:
    return signed("stripe", key=OLD["stripe"])["stripe-signature"].split(",")[1]


def test_stripe_accepts_the_one_matching_v1_among_several() -> None:
    timestamp, good = signed("stripe")["stripe-signature"].split(",")
    value = ",".join([timestamp, wrong_stripe_signature(), f"v0={HEX64}", good, f"v1={HEX64}"])
    assert verify("stripe", {"stripe-signature": value}) is None


def test_stripe_rejects_more_than_8_signatures() -> None:
    timestamp, good = signed("stripe")["stripe-signature"].split(",")
    value = ",".join([timestamp] + [f"v1={HEX64}"] * 8 + [good])
    with pytest.raises(InvalidSignature, match="too many signatures"):
        verify("stripe", {"stripe-signature": value})


def test_stripe_considers_up_to_8_signatures() -> None:
    timestamp, good = signed("stripe")["stripe-signature"].split(",")
    value = ",".join([timestamp] + [f"v1={HEX64}"] * 7 + [good])
    assert verify("stripe", {"stripe-signature": value}) is None


def test_standard_accepts_the_one_matching_v1_among_several() -> None:
    headers = signed("standard")
    wrong = sign("standard", OLD["standard"].signing, BODY, now=NOW, extra=headers)
    wrong = signed("standard", key=OLD["standard"]) | {"webhook-id": headers["webhook-id"]}
    entries = ["v1a,AAAA", wrong["webhook-signature"], headers["webhook-signature"], "v2,AAAA"]
    assert verify("standard", headers | {"webhook-signature": " ".join(entries)}) is None


def test_standard_rejects_more_than_8_signatures() -> None:
    headers = signed("standard")
    value = " ".join(["v1,AAAA"] * 8 + [headers["webhook-signature"]])
    with pytest.raises(InvalidSignature, match="too many signatures"):
        verify("standard", headers | {"webhook-signature": value})


@pytest.mark.parametrize("source", ALL_SOURCES)
@pytest.mark.parametrize("keyring", [NEW, OLD], ids=["new", "previous"])
def test_during_rotation_either_secret_is_accepted(source: str, keyring: dict[str, Key]) -> None:
    headers = signed(source, key=keyring[source])
    assert verify(source, headers, keys=[NEW[source], OLD[source]]) is None


def one_byte_changed(body: bytes, index: int = 7) -> bytes:
    changed = bytearray(body)
    changed[index] ^= 0x01
    return bytes(changed)


@pytest.mark.parametrize("source", BODY_SIGNING_SOURCES)
def test_body_changed_by_one_byte_is_rejected(source: str) -> None:
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(source, signed(source), one_byte_changed(BODY))


@pytest.mark.parametrize("source", TOKEN_SOURCES)
def test_token_sources_authenticate_the_sender_not_the_body(source: str) -> None:
    assert verify(source, signed(source), one_byte_changed(BODY)) is None


def test_unknown_source_is_rejected() -> None:
    with pytest.raises(InvalidSignature, match="unknown source"):
        verify_signature("gitlab", ["secret"], {"x-gitlab-token": "secret"}, BODY)


@pytest.mark.parametrize("source", ALL_SOURCES)
@pytest.mark.parametrize("configured", [[], [""]])
def test_no_secret_is_rejected(source: str, configured: list[str]) -> None:
    with pytest.raises(InvalidSignature, match="no secret configured"):
        verify_signature(source, configured, signed(source), BODY, now=NOW)


def test_a_bare_string_is_one_secret_not_one_per_character() -> None:
    secret = NEW["github"].verifying
    assert verify_signature("github", secret, signed("github"), BODY) is None
    with pytest.raises(InvalidSignature):
        verify_signature("github", "g", {"x-hub-signature-256": ""}, BODY)


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_reason_reveals_neither_secret_nor_expected_signature(source: str) -> None:
    expected = [value for name, value in signed(source).items() if name not in PUBLIC_HEADERS]
    with pytest.raises(InvalidSignature) as caught:
        verify(source, signed(source, key=OLD[source]))
    for hidden in [NEW[source].verifying, NEW[source].signing, *expected]:
        assert hidden not in str(caught.value)


def test_clock_defaults_to_now() -> None:
    for source in TIMESTAMPED_SOURCES:
        assert verify(source, sign(source, NEW[source].signing, BODY), now=None) is None
    with pytest.raises(InvalidSignature, match="too old"):
        verify("stripe", signed("stripe"), now=None)


@pytest.mark.parametrize("source", ["discord", "standard"])
def test_unusable_configured_key_is_rejected(source: str) -> None:
    with pytest.raises(InvalidSignature, match="no usable"):
        verify_signature(source, ["not base64 nor hex!"], signed(source), BODY, now=NOW)


def test_standard_secret_without_prefix_or_padding_is_accepted() -> None:
    bare = NEW["standard"].verifying.removeprefix("whsec_").rstrip("=")
    assert verify_signature("standard", [bare], signed("standard"), BODY, now=NOW) is None


def test_standard_accepts_what_the_standardwebhooks_library_signs() -> None:
    secret = NEW["standard"].verifying
    sent_at = datetime.fromtimestamp(NOW, UTC)
    signature = Webhook(secret).sign("msg_1", sent_at, BODY.decode())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(NOW)), "webhook-signature": signature}
    assert verify("standard", headers) is None


def test_standard_sign_helper_passes_the_standardwebhooks_library() -> None:
    headers = sign("standard", NEW["standard"].signing, BODY)
    assert Webhook(NEW["standard"].verifying).verify(BODY, headers, json_parse=False) is None
