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
# Timestamps and ids: signed, but neither secret nor a signature.
PUBLIC_HEADERS = [
    "webhook-id",
    "webhook-timestamp",
    "x-signature-timestamp",
    "x-slack-request-timestamp",
]
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
REQUIRED_HEADERS = [
    (source, name)
    for source in ALL_SOURCES
    for name in sorted(sign(source, NEW[source].signing, BODY))
]


def signed(
    source: str, body: bytes = BODY, *, key: Key | None = None, now: float = NOW
) -> dict[str, str]:
    return sign(source, (key or NEW[source]).signing, body, now=now)


def verify(
    source: str,
    headers: dict[str, str],
    body: bytes = BODY,
    *,
    keys: list[Key] | None = None,
    now: float | None = NOW,
) -> None:
    secrets_in_use = [key.verifying for key in keys or [NEW[source]]]
    verify_signature(source, secrets_in_use, headers, body, now=now)


def test_sources_are_the_nine_documented_ones() -> None:
    assert set(SIGNATURE_HEADER) == SOURCES


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_valid_signature_is_accepted(source: str) -> None:
    verify(source, signed(source))


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
    verify(source, signed(source, now=NOW + offset))


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
    verify("linear", signed("linear", body), body)


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
    verify("linear", signed("linear", body), body)


def wrong_stripe_signature() -> str:
    return signed("stripe", key=OLD["stripe"])["stripe-signature"].split(",")[1]


def test_stripe_accepts_the_one_matching_v1_among_several() -> None:
    timestamp, good = signed("stripe")["stripe-signature"].split(",")
    value = ",".join([timestamp, wrong_stripe_signature(), f"v0={HEX64}", good, f"v1={HEX64}"])
    verify("stripe", {"stripe-signature": value})


def test_stripe_rejects_more_than_8_signatures() -> None:
    timestamp, good = signed("stripe")["stripe-signature"].split(",")
    value = ",".join([timestamp] + [f"v1={HEX64}"] * 8 + [good])
    with pytest.raises(InvalidSignature, match="too many signatures"):
        verify("stripe", {"stripe-signature": value})


def test_stripe_considers_up_to_8_signatures() -> None:
    timestamp, good = signed("stripe")["stripe-signature"].split(",")
    value = ",".join([timestamp] + [f"v1={HEX64}"] * 7 + [good])
    verify("stripe", {"stripe-signature": value})


def test_standard_accepts_the_one_matching_v1_among_several() -> None:
    headers = signed("standard")
    same_id = {"webhook-id": headers["webhook-id"]}
    wrong = sign("standard", OLD["standard"].signing, BODY, now=NOW, extra=same_id)
    entries = ["v1a,AAAA", wrong["webhook-signature"], headers["webhook-signature"], "v2,AAAA"]
    verify("standard", headers | {"webhook-signature": " ".join(entries)})


def test_standard_rejects_more_than_8_signatures() -> None:
    headers = signed("standard")
    value = " ".join(["v1,AAAA"] * 8 + [headers["webhook-signature"]])
    with pytest.raises(InvalidSignature, match="too many signatures"):
        verify("standard", headers | {"webhook-signature": value})


@pytest.mark.parametrize("source", ALL_SOURCES)
@pytest.mark.parametrize("keyring", [NEW, OLD], ids=["new", "previous"])
def test_during_rotation_either_secret_is_accepted(source: str, keyring: dict[str, Key]) -> None:
    headers = signed(source, key=keyring[source])
    verify(source, headers, keys=[NEW[source], OLD[source]])


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
    verify(source, signed(source), one_byte_changed(BODY))


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
    verify_signature("github", secret, signed("github"), BODY)
    with pytest.raises(InvalidSignature, match="does not match"):
        verify_signature("github", "ab", sign("github", "a", BODY), BODY)


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_reason_reveals_neither_secret_nor_expected_signature(source: str) -> None:
    expected = [value for name, value in signed(source).items() if name not in PUBLIC_HEADERS]
    with pytest.raises(InvalidSignature) as caught:
        verify(source, signed(source, key=OLD[source]))
    for hidden in [NEW[source].verifying, NEW[source].signing, *expected]:
        assert hidden not in str(caught.value)


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("telegram", "x-telegram-bot-api-secret-token"),
        ("evolution", "apikey"),
        ("standard", "webhook-id"),
        ("discord", "x-signature-timestamp"),
    ],
)
def test_header_that_was_not_utf8_is_rejected_not_crashed(source: str, name: str) -> None:
    # aiohttp hands on undecodable header bytes as lone surrogates.
    undecodable = b"tok\xff\xfe".decode("utf-8", "surrogateescape")
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(source, signed(source) | {name: undecodable})


def test_clock_defaults_to_now() -> None:
    for source in TIMESTAMPED_SOURCES:
        verify(source, sign(source, NEW[source].signing, BODY), now=None)
    with pytest.raises(InvalidSignature, match="too old"):
        verify("stripe", signed("stripe"), now=None)


@pytest.mark.parametrize("source", ["discord", "standard"])
def test_unusable_configured_key_is_rejected(source: str) -> None:
    with pytest.raises(InvalidSignature, match="no usable"):
        verify_signature(source, ["not base64 nor hex!"], signed(source), BODY, now=NOW)


def test_standard_secret_without_prefix_or_padding_is_accepted() -> None:
    bare = NEW["standard"].verifying.removeprefix("whsec_").rstrip("=")
    verify_signature("standard", [bare], signed("standard"), BODY, now=NOW)


def test_standard_accepts_what_the_standardwebhooks_library_signs() -> None:
    secret = NEW["standard"].verifying
    sent_at = datetime.fromtimestamp(NOW, UTC)
    signature = Webhook(secret).sign("msg_1", sent_at, BODY.decode())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(NOW)),
        "webhook-signature": signature,
    }
    verify("standard", headers)


def test_standard_sign_helper_passes_the_standardwebhooks_library() -> None:
    headers = sign("standard", NEW["standard"].signing, BODY)
    assert Webhook(NEW["standard"].verifying).verify(BODY, headers, json_parse=False) is None


def test_redaction_hides_every_credential_header() -> None:
    stored = redact_headers((name.title(), "s3cret") for name in REDACTED_HEADERS)
    assert stored == dict.fromkeys(REDACTED_HEADERS, "[redacted]")


def test_redaction_keeps_other_headers_under_lower_case_names() -> None:
    stored = redact_headers([("Content-Type", "application/json"), ("X-GitHub-Delivery", "d-1")])
    assert stored == {"content-type": "application/json", "x-github-delivery": "d-1"}


def test_redaction_joins_repeated_headers() -> None:
    stored = redact_headers(
        [("Accept", "a"), ("Cookie", "k=1"), ("accept", "b"), ("cookie", "j=2")]
    )
    assert stored == {"accept": "a, b", "cookie": "[redacted]"}


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_redaction_keeps_no_signature_or_secret_of_any_source(source: str) -> None:
    headers = signed(source)
    stored = redact_headers(headers.items())
    assert stored[SIGNATURE_HEADER[source]] == "[redacted]"
    for name in set(headers) - set(PUBLIC_HEADERS):
        assert stored[name] == "[redacted]"
    assert NEW[source].signing not in str(stored)


def test_redaction_keeps_timestamps_and_ids() -> None:
    assert all(name == name.lower() for name in REDACTED_HEADERS)
    assert REDACTED_HEADERS.isdisjoint(PUBLIC_HEADERS)


KNOWN_NAMES = sorted({name for _, name in REQUIRED_HEADERS} | {"content-type", "authorization"})
header_names = st.one_of(st.sampled_from(KNOWN_NAMES), st.text(max_size=20))
# aiohttp decodes header bytes that are not UTF-8 with surrogateescape: lone surrogates.
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
header_values = st.one_of(
    st.text(),
    st.text(alphabet=st.characters() | surrogates),
    st.builds(
        str.__add__,
        st.sampled_from(["", "sha256=", "v0=", "v1,", "t=", "t=1700000000,v1=", "v1="]),
        st.text(alphabet="0123456789abcdefABCDEF=,+/ tv1", max_size=200),
    ),
    st.integers(min_value=4000, max_value=5000).map(lambda size: "a" * size),
)


def verify_or_reject(source: str, headers: dict[str, str], body: bytes, now: float | None) -> None:
    try:
        verify(source, headers, body, now=now)
    except InvalidSignature as error:
        assert error.reason


@given(
    source=st.sampled_from(ALL_SOURCES),
    headers=st.dictionaries(header_names, header_values, max_size=6),
    body=st.binary(max_size=512),
    now=st.one_of(st.none(), st.floats()),
)
def test_any_headers_and_body_only_raise_invalid_signature(
    source: str, headers: dict[str, str], body: bytes, now: float | None
) -> None:
    verify_or_reject(source, headers, body, now)


@given(source=st.sampled_from(ALL_SOURCES), body=st.binary(max_size=512), data=st.data())
def test_one_mangled_header_only_raises_invalid_signature(
    source: str, body: bytes, data: st.DataObject
) -> None:
    headers = signed(source, body)
    name = data.draw(st.sampled_from(sorted(headers)))
    verify_or_reject(source, headers | {name: data.draw(header_values)}, body, NOW)


@given(source=st.sampled_from(ALL_SOURCES), body=st.binary(max_size=2048))
def test_any_body_signed_by_its_sender_is_accepted(source: str, body: bytes) -> None:
    assume(b"webhookTimestamp" not in body)
    verify(source, signed(source, body), body)


@given(source=st.sampled_from(BODY_SIGNING_SOURCES), body=st.binary(min_size=1), data=st.data())
def test_any_changed_byte_is_rejected(source: str, body: bytes, data: st.DataObject) -> None:
    index = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    changed = bytearray(body)
    changed[index] ^= data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(source, signed(source, body), bytes(changed))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=8,
)


@given(sent_at=json_values)
def test_linear_any_body_timestamp_only_raises_invalid_signature(sent_at: object) -> None:
    body = linear_body(sent_at)
    verify_or_reject("linear", signed("linear", body), body, NOW)


@given(st.lists(st.tuples(header_names, st.text()), max_size=10))
def test_redaction_never_stores_a_credential(headers: list[tuple[str, str]]) -> None:
    stored = redact_headers(headers)
    assert set(stored) == {name.lower() for name, _ in headers}
    for name in REDACTED_HEADERS & set(stored):
        assert stored[name] == "[redacted]"
