"""Idempotency key rules, in SPEC.md's order, first match wins."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.bodies import FORM_KIND, JSON_KIND, decode_body
from ledger.errors import InvalidIdempotencyKey
from ledger.keys import extract_key


def key(
    source: str = "generic",
    path: str | None = None,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> str | None:
    return extract_key(source, path, headers or {}, body)


def test_configured_header_path_wins_over_everything() -> None:
    headers = {"x-my-id": "mine", "idempotency-key": "general"}
    assert key(path="X-My-Id", headers=headers, body={"idempotency_key": "b"}) == "mine"
    assert key(path="header:X-My-Id", headers=headers) == "mine"


def test_configured_body_path_wins_over_headers() -> None:
    body = {"data": {"key": {"id": "deep"}}}
    assert key(path="data.key.id", headers={"idempotency-key": "h"}, body=body) == "deep"
    assert key(path="body:data.key.id", headers={"idempotency-key": "h"}, body=body) == "deep"


def test_configured_path_missing_falls_through_to_general_rules() -> None:
    assert key(path="data.nothing", headers={"idempotency-key": "h"}, body={}) == "h"


def test_idempotency_key_header_before_webhook_id() -> None:
    assert key(headers={"idempotency-key": "a", "webhook-id": "b"}) == "a"


def test_webhook_id_before_source_delivery_id() -> None:
    assert key("github", headers={"webhook-id": "w", "x-github-delivery": "g"}) == "w"


@pytest.mark.parametrize(
    ("source", "headers", "body", "expected"),
    [
        ("github", {"x-github-delivery": "gh-1"}, {"idempotency_key": "no"}, "gh-1"),
        ("linear", {"linear-delivery": "lin-1"}, {}, "lin-1"),
        ("stripe", {}, {"id": "evt_1", "idempotency_key": "no"}, "evt_1"),
        ("slack", {}, {"event_id": "Ev1"}, "Ev1"),
        ("telegram", {}, {"update_id": 123456789}, "123456789"),
        ("discord", {}, {"id": "9876"}, "9876"),
        ("evolution", {}, {"data": {"key": {"id": "WAMID"}}}, "WAMID"),
        ("generic", {"x-github-delivery": "gh-2"}, {}, "gh-2"),
    ],
)
def test_source_delivery_ids(
    source: str, headers: dict[str, str], body: Any, expected: str
) -> None:
    assert key(source, headers=headers, body=body) == expected


def test_body_id_is_not_a_key_for_generic_sources() -> None:
    assert key("generic", body={"id": "just-a-field"}) is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"idempotency_key": "a", "messageId": "b"}, "a"),
        ({"messageId": "b", "data": {"messageId": "c"}}, "b"),
        ({"data": {"messageId": "c", "idempotency_key": "d"}}, "c"),
        ({"data": {"idempotency_key": "d"}}, "d"),
    ],
)
def test_body_rules_in_order(body: Any, expected: str) -> None:
    assert key(body=body) == expected


@pytest.mark.parametrize("value", [{"a": 1}, [1, 2], 1.5, True, False, None, ""])
def test_other_json_types_are_ignored_for_that_rule(value: Any) -> None:
    assert key(body={"idempotency_key": value, "messageId": "next"}) == "next"
    assert key(body={"idempotency_key": value}) is None


def test_integer_keys_are_written_in_decimal() -> None:
    assert key(body={"idempotency_key": 42}) == "42"
    assert key(body={"idempotency_key": -7}) == "-7"


def test_integers_of_any_size_are_their_decimal_text() -> None:
    assert key(body={"idempotency_key": 2**64}) == "18446744073709551616"
    assert key(body={"idempotency_key": -(2**63) - 1}) == "-9223372036854775809"
    assert key(body={"idempotency_key": 10**254}) == "1" + "0" * 254  # 255 characters


def test_an_integer_key_longer_than_255_characters_is_rejected() -> None:
    with pytest.raises(InvalidIdempotencyKey):
        key(body={"idempotency_key": 10**255})


@pytest.mark.parametrize("value", [float(2**64), -float(2**63), 1e20, 1e300, 1.0, -0.0])
def test_whole_floats_of_any_size_are_ignored_for_that_rule(value: float) -> None:
    assert key(body={"idempotency_key": value, "messageId": "next"}) == "next"
    assert key(body={"idempotency_key": value}) is None


def key_of_json(text: str, source: str = "generic", path: str | None = None) -> str | None:
    """The key of a JSON body as the receiver reads it: the JSON text decides integer or float."""
    body = decode_body(JSON_KIND, text.encode())
    return extract_key(source, path, {}, body.parsed, body.exact)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Integer literals past 64 bits, which orjson reads as floats: their exact text.
        ('{"idempotency_key": 18446744073709551616}', "18446744073709551616"),
        ('{"idempotency_key": 18446744073709551617}', "18446744073709551617"),
        ('{"idempotency_key": -9223372036854775809}', "-9223372036854775809"),
        ('{"idempotency_key": 100000000000000000000, "messageId": "m"}', "100000000000000000000"),
        # Float literals, however whole or large: ignored, the next rule wins.
        ('{"idempotency_key": 1e20, "messageId": "next"}', "next"),
        ('{"idempotency_key": 1e300, "messageId": "next"}', "next"),
        ('{"idempotency_key": 18446744073709551616.0, "messageId": "next"}', "next"),
        ('{"idempotency_key": 1E19, "messageId": 18446744073709551617}', "18446744073709551617"),
        ('{"idempotency_key": 1.0}', None),
        # A wide float at an earlier rule, an integer at a later one: each judged by its text.
        (
            '{"messageId": 2e19, "data": {"messageId": 20000000000000000000}}',
            "20000000000000000000",
        ),
    ],
)
def test_the_json_text_tells_an_integer_key_from_a_float(text: str, expected: str | None) -> None:
    assert key_of_json(text) == expected


def test_source_ids_past_64_bits_stay_exact() -> None:
    assert key_of_json('{"update_id": 18446744073709551617}', "telegram") == "18446744073709551617"
    assert key_of_json('{"id": 99999999999999999999}', "stripe") == "99999999999999999999"
    text = '{"data": {"key": {"id": 36893488147419103232}}}'
    assert key_of_json(text, path="data.key.id") == "36893488147419103232"


def test_a_form_payload_keeps_integer_ids_past_64_bits_exact() -> None:
    form = "payload=" + quote_plus(
        '{"messageId": 1e20, "data": {"messageId": 18446744073709551617}}'
    )
    body = decode_body(FORM_KIND, form.encode())
    assert extract_key("slack", None, {}, body.parsed, body.exact) == "18446744073709551617"


def test_an_integer_literal_longer_than_255_digits_is_rejected() -> None:
    assert key_of_json('{"idempotency_key": 1%s}' % ("0" * 254)) == "1" + "0" * 254
    with pytest.raises(InvalidIdempotencyKey):
        key_of_json('{"idempotency_key": 1%s}' % ("0" * 255))


@given(st.integers(min_value=-(10**254) + 1, max_value=10**255 - 1))
def test_any_integer_literal_is_its_exact_decimal_text(value: int) -> None:
    assert key_of_json(f'{{"x": 1.5, "idempotency_key": {value}}}') == str(value)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_any_float_literal_is_ignored(value: float) -> None:
    assert key_of_json(f'{{"idempotency_key": {value!r}, "messageId": "next"}}') == "next"


def test_no_key_at_all() -> None:
    assert key(headers={"content-type": "application/json"}, body={"x": 1}) is None
    assert key(body=None) is None
    assert key(body=[1, 2, 3]) is None


@pytest.mark.parametrize("bad", ["x" * 256, "a\nb", "tab\there", "nul\x00", "del\x7f", "c1\x85"])
def test_invalid_keys_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidIdempotencyKey):
        key(headers={"idempotency-key": bad})


def test_longest_valid_key() -> None:
    assert key(headers={"idempotency-key": "k" * 255}) == "k" * 255


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    body=json_values,
    headers=st.dictionaries(
        st.sampled_from(["idempotency-key", "webhook-id", "x-github-delivery", "x"]),
        st.text(max_size=300),
        max_size=4,
    ),
    source=st.sampled_from(["generic", "github", "stripe", "telegram", "evolution", "discord"]),
    path=st.none() | st.sampled_from(["data.key.id", "x", "header:x", "body:a.b"]),
)
def test_key_extraction_never_raises_anything_but_the_declared_error(
    body: Any, headers: dict[str, str], source: str, path: str | None
) -> None:
    try:
        result = key(source, path, headers, body)
    except InvalidIdempotencyKey:
        return
    assert result is None or (isinstance(result, str) and 0 < len(result) <= 255)
