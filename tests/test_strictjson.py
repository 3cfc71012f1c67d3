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
