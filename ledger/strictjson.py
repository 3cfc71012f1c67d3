"""Strict JSON: orjson's parse, plus the one check orjson leaves out — duplicate object keys.

orjson keeps the last of duplicate keys silently, so a body could say one thing to us and another to
a parser that keeps the first. Finding them costs one `orjson.dumps` of the parsed value:

    a colon outside a string only ever separates a member's key from its value, so the text's colon
    count is (members) + (colons inside its strings). The parsed value, written back, counts the
    same unless members were dropped — duplicates — which drop their strings too, so the written
    count can only fall. Equal counts: no duplicates; lower: some.

Colons written as the escape `\\u003a` are counted in as well; the check stays exact.

orjson also reads an integer past 64 bits as a float (`100000000000000000000` as `1e20`'s value):
`loads_exact` parses again, with each integer written in the text an exact int, for the rare
reader that must tell the two apart (ledger/keys.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

__all__ = ["DuplicateKeys", "has_duplicate_keys", "loads", "loads_exact"]

# A JSON text's strings and numbers, in order, the numbers captured (a string's capture is empty);
# in valid JSON a number ends where this stops.
_STRING_OR_NUMBER = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|(-?[0-9][0-9.eE+-]*)')


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


def loads_exact(raw: bytes | str) -> Any:
    """`loads`, with every integer written in `raw` an int however long, where orjson gives a
    float past 64 bits; a number written with a fraction or an exponent stays a float.

    The numbers of the text and those of the parsed value come in the same order (no member was
    dropped: `loads` refuses duplicate keys), so each float is paired with the literal it was read
    from. A regex over the whole text and a walk of the value (~9 times `loads`: 28 ms for a
    1 MB body of 20,000 numbers), for the rare body that needs it, never for every one."""
    root = [loads(raw)]
    text = raw.encode("utf-8") if isinstance(raw, str) else raw
    literals = [number for number in _STRING_OR_NUMBER.findall(text) if number]
    for (container, slot), literal in zip(_number_slots(root), literals, strict=True):
        if isinstance(container[slot], float) and literal.lstrip(b"-").isdigit():
            container[slot] = int(literal)
    return root[0]


def _number_slots(root: list[Any]) -> Iterator[tuple[Any, Any]]:
    """(container, index or key) of each number under `root`, in the text's order, without
    recursion (a body may be nested 1,024 deep)."""
    stack: list[tuple[Any, Iterator[Any]]] = [(root, iter(range(len(root))))]
    while stack:
        container, slots = stack[-1]
        slot = next(slots, _END)
        if slot is _END:
            stack.pop()
            continue
        node = container[slot]
        if isinstance(node, dict):
            stack.append((node, iter(node)))
        elif isinstance(node, list):
            stack.append((node, iter(range(len(node)))))
        elif isinstance(node, int | float) and not isinstance(node, bool):
            yield container, slot


_END = object()


def has_duplicate_keys(raw: bytes, parsed: Any) -> bool:
    """Whether `raw` (valid JSON, parsed into `parsed`) names a key twice in one object."""
    colons = raw.count(b":")
    if colons == 0:
        return False
    if b"\\u003" in raw:  # a search in C; the escapes themselves are rare
        colons += _escaped_colons(raw)
    try:
        written = orjson.dumps(parsed).count(b":")
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels)
        written = _colons_of(parsed)
    return written != colons


def _escaped_colons(raw: bytes) -> int:
    """The escapes \\u003a and \\u003A in `raw` that are escapes (not the text after an
    escaped backslash: an even run of backslashes before them), found with `bytes.find`: a regex
    scanned every byte in Python's engine, ~60 ns each, and any body with a backslash (a commit
    message's newline) paid it: 0.6 ms for a 10 KB GitHub push."""
    count, at = 0, raw.find(b"\\u003")
    while at != -1:
        if raw[at + 5 : at + 6] in (b"a", b"A"):
            start = at
            while start > 0 and raw[start - 1] == 0x5C:  # the backslashes just before
                start -= 1
            count += (at - start) % 2 == 0
        at = raw.find(b"\\u003", at + 1)
    return count


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
