"""Strict JSON: orjson's parse, plus the one check orjson leaves out — duplicate object keys.

orjson keeps the last of duplicate keys silently, so a body could say one thing to us and another to
a parser that keeps the first. Finding them costs one `orjson.dumps` of the parsed value:

    a colon outside a string only ever separates a member's key from its value, so the text's colon
    count is (members) + (colons inside its strings). The parsed value, written back, counts the
    same unless members were dropped — duplicates — which drop their strings too, so the written
    count can only fall. Equal counts: no duplicates; lower: some.

Colons written as the escape `\\u003a` are counted in as well; the check stays exact.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

__all__ = ["DuplicateKeys", "has_duplicate_keys", "loads"]

# An escape \u003a (a colon in a string) that is not itself escaped: preceded by an even run of \.
_ESCAPED_COLON = re.compile(rb"(?<!\\)(?:\\\\)*\\u003[aA]")


class DuplicateKeys(ValueError):
    def __str__(self) -> str:
        return "an object has the same key twice"


def loads(raw: bytes | str) -> Any:
    """orjson.loads that also refuses duplicate keys (DuplicateKeys, a ValueError like
    orjson.JSONDecodeError)."""
    value = orjson.loads(raw)
    text = raw.encode("utf-8") if isinstance(raw, str) else raw
    if has_duplicate_keys(text, value):
        raise DuplicateKeys()
    return value


def has_duplicate_keys(raw: bytes, parsed: Any) -> bool:
    """Whether `raw` (valid JSON, parsed into `parsed`) names a key twice in one object."""
    colons = raw.count(b":")
    if colons == 0:
        return False
    if b"\\" in raw:  # one byte: a memchr, where a two-byte search costs 4x as much
        colons += len(_ESCAPED_COLON.findall(raw))
    try:
        written = orjson.dumps(parsed).count(b":")
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels)
        written = _colons_of(parsed)
    return written != colons


def _colons_of(parsed: Any) -> int:
    """The colons `orjson.dumps(parsed)` would write, counted without recursion."""
    count = 0
    stack = [parsed]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            count += len(node) + sum(key.count(":") for key in node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            count += node.count(":")
    return count
