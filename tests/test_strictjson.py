"""Duplicate keys: the cheap colon-count check agrees with a parser that sees every member."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import strictjson


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Duplicate()
    return dict(pairs)


def reference_has_duplicates(text: str) -> bool:
    try:
        json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate:
        return True
    return False


# Few, colon-laden names, so that duplicates (and colons in strings) are common.
NAMES = st.sampled_from(["a", "b", ":", "a:b", "", "\\", "\\u003a", "::"])
TEXTS = st.one_of(NAMES, st.text(alphabet=':"\\ax\u00e9\U0001f600', max_size=8))


@st.composite
def string_literal(draw: st.DrawFn, texts: st.SearchStrategy[str]) -> str:
    literal = json.dumps(draw(texts))
    escape = draw(st.sampled_from(["", "\\u003a", "\\u003A"]))
    return literal.replace(":", escape) if escape else literal


def scalar_literal() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["null", "true", "false", "0", "-1.5e3", "18446744073709551616"]),
        st.integers(-(10**30), 10**30).map(str),
        string_literal(TEXTS),
    )


def document() -> st.SearchStrategy[str]:
    def containers(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        members = st.lists(st.tuples(string_literal(NAMES), children), max_size=5)
        return st.one_of(
            st.lists(children, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
            members.map(lambda ms: "{" + ", ".join(f"{k}: {v}" for k, v in ms) + "}"),
        )

    return st.recursive(scalar_literal(), containers, max_leaves=20)


@given(document())
def test_the_check_agrees_with_a_parser_that_sees_every_member(text: str) -> None:
    expected = reference_has_duplicates(text)
    try:
        strictjson.loads(text.encode())
    except strictjson.DuplicateKeys:
        assert expected
    else:
        assert not expected


@pytest.mark.parametrize("depth", [10, 254, 255, 600, 1023])
def test_deep_documents_are_checked_past_what_orjson_writes(depth: int) -> None:
    distinct = '{"x":' * depth + '{"a": 1, "b": 2}' + "}" * depth
    duplicated = '{"x":' * depth + '{"a": 1, "a": 2}' + "}" * depth
    strictjson.loads(distinct)
    with pytest.raises(strictjson.DuplicateKeys):
        strictjson.loads(duplicated)


def typed(value: Any) -> Any:
    """`value` with every leaf paired with its type: 1 and 1.0 differ, as an int and a float."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value), value)


# Integers past 64 bits and up to a double's range (orjson refuses a number past it); strings of
# digits and quotes, so that numbers inside strings are passed over.
NUMBERS = (
    st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([2**64, 2**64 + 1, -(2**63) - 1, float(2**64), 1e20, 1e300, -0.0])
)
LEAVES = NUMBERS | st.booleans() | st.none() | st.text(alphabet='0123456789.e-"\\ ', max_size=30)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXTS, inner, max_size=4),
    max_leaves=20,
)


@given(VALUES, st.booleans())
def test_loads_exact_reads_what_pythons_parser_reads_integers_and_floats_alike(
    value: Any, ensure_ascii: bool
) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    assert typed(strictjson.loads_exact(text)) == typed(json.loads(text))
    assert typed(strictjson.loads_exact(text.encode())) == typed(json.loads(text))


def test_loads_exact_keeps_integers_past_64_bits_that_loads_reads_as_floats() -> None:
    text = '{"a": [18446744073709551616, 18446744073709551617, 1e20, 100000000000000000000]}'
    assert strictjson.loads(text) == {"a": [2.0**64, 2.0**64, 1e20, 1e20]}
    exact = strictjson.loads_exact(text)["a"]
    assert typed(exact) == typed([2**64, 2**64 + 1, 1e20, 10**20])


def test_loads_exact_goes_as_deep_as_loads() -> None:
    text = "[" * 1024 + "18446744073709551617" + "]" * 1024
    value = strictjson.loads_exact(text)
    for _ in range(1024):
        value = value[0]
    assert value == 2**64 + 1 and isinstance(value, int)


def test_loads_exact_refuses_duplicate_keys_as_loads_does() -> None:
    with pytest.raises(strictjson.DuplicateKeys):
        strictjson.loads_exact('{"a": 18446744073709551617, "a": 1}')
