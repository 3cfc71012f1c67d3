"""Idempotency keys: which value of a delivery identifies it, by SPEC.md's rules, first match wins.

1. the trigger's own `idempotency_key_path` (`header:NAME`, `body:PATH`, or a bare name: a header
   of that name when present, else a dotted body path);
2. header `Idempotency-Key`;  3. header `webhook-id` (Svix's `svix-id`);
4. the source's own delivery id;  5. body `idempotency_key`, `messageId`, `data.messageId`,
   `data.idempotency_key`.
A key is a non-empty string or an integer written in decimal (the key is its exact decimal text,
however long); other JSON types at a path, floats included, are passed over.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ledger.errors import InvalidIdempotencyKey

MAX_KEY_LENGTH = 255

# Rule 4: where each source puts its own delivery id ("header" names are lower-case).
SOURCE_KEYS: Mapping[str, tuple[str, str]] = {
    "github": ("header", "x-github-delivery"),
    "linear": ("header", "linear-delivery"),
    "stripe": ("body", "id"),
    "slack": ("body", "event_id"),
    "telegram": ("body", "update_id"),
    "discord": ("body", "id"),
    "evolution": ("body", "data.key.id"),
}
# Header ids are unambiguous, so a generic or standard trigger honours them too.
_ANY_SOURCE_HEADERS = ("x-github-delivery", "linear-delivery")
# svix-id: Svix's name for webhook-id, unless the account has its headers white-labelled.
_GENERAL_HEADERS = ("idempotency-key", "webhook-id", "svix-id")
_GENERAL_BODY_PATHS = ("idempotency_key", "messageId", "data.messageId", "data.idempotency_key")
# orjson reads an integer past 64 bits (>= 2**64, < -2**63) as a float, of this size or more.
_WIDE = 2.0**63
CONTROL_CHARACTERS = r"\x00-\x1f\x7f-\x9f"  # C0, DEL and C1, as a regex class's inside
_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]")


def body_value(body: Any, path: str) -> Any:
    """The value at a dotted path of a parsed body, or None when any step is missing."""
    node = body
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def key_of(value: Any) -> str | None:
    """A usable key from a JSON value, or None when the value's type is not a key's."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value:
        return value
    return None


def validate_key(key: str) -> str:
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(f"longer than {MAX_KEY_LENGTH} characters")
    if _CONTROL.search(key):
        raise InvalidIdempotencyKey("contains control characters")
    return key


def _candidates(
    source: str, key_path: str | None, headers: Mapping[str, str], body: Any
) -> Iterable[Any]:
    if key_path:
        yield from _configured(key_path, headers, body)
    for name in _GENERAL_HEADERS:
        yield headers.get(name)
    kind, where = SOURCE_KEYS.get(source, ("", ""))
    if kind == "header":
        yield headers.get(where)
    elif kind == "body":
        yield body_value(body, where)
    if source in ("generic", "standard"):
        for name in _ANY_SOURCE_HEADERS:
            yield headers.get(name)
    for path in _GENERAL_BODY_PATHS:
        yield body_value(body, path)


def _configured(key_path: str, headers: Mapping[str, str], body: Any) -> Iterable[Any]:
    prefix, _, rest = key_path.partition(":")
    if rest and prefix == "header":
        yield headers.get(rest.lower())
    elif rest and prefix == "body":
        yield body_value(body, rest)
    else:
        yield headers.get(key_path.lower())
        yield body_value(body, key_path)


def extract_key(
    source: str,
    key_path: str | None,
    headers: Mapping[str, str],
    body: Any,
    exact_body: Callable[[], Any] | None = None,
) -> str | None:
    """The delivery's idempotency key, or None (every delivery new).

    `headers` has lower-case names; `body` is the parsed body (None for text bodies), and
    `exact_body` the same body parsed with its integers exact (ledger/strictjson.py
    `loads_exact`): asked for only when a key path holds a float as wide as one orjson makes of
    an integer past 64 bits, so that the text decides (an integer is a key, a float is not) and
    two such ids never collapse into one.
    Raises InvalidIdempotencyKey for a key too long or with control characters.
    """
    for value in _candidates(source, key_path, headers, body):
        if exact_body is not None and isinstance(value, float) and abs(value) >= _WIDE:
            return extract_key(source, key_path, headers, exact_body())
        key = key_of(value)
        if key is not None:
            return validate_key(key)
    return None
