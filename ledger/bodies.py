"""Decoding a delivery's body: which content types are accepted, and what the body says.

The stored body is always the exact text received; parsing only serves keys and filters.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson
from yarl import query_to_pairs

from ledger import strictjson
from ledger.errors import InvalidBody

JSON_KIND, FORM_KIND, TEXT_KIND = "json", "form", "text"


def content_kind(content_type: str) -> str | None:
    """json, form or text for an accepted media type (parameters already stripped), else None."""
    media = content_type.strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return JSON_KIND
    if media == "application/x-www-form-urlencoded":
        return FORM_KIND
    if media == "text/plain":
        return TEXT_KIND
    return None


@dataclass(frozen=True, slots=True)
class Body:
    text: str  # the exact text received, or its base64 when it is not UTF-8 text
    encoding: str  # "utf-8" or "base64"
    parsed: Any  # the JSON value keys and filters read; None for plain text
    json_text: bytes | str | None = None  # what `parsed` was read from (a form's: its payload)

    def exact(self) -> Any:
        """`parsed`, read again with every integer exact (orjson reads one past 64 bits as a
        float): a new value, for the key rules that must tell an integer from a float."""
        return self.parsed if self.json_text is None else strictjson.loads_exact(self.json_text)


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidBody(f"body is not valid UTF-8 (byte {exc.start})") from exc


def _json(raw: bytes | str) -> Any:
    try:
        return strictjson.loads(raw)  # orjson, and duplicate keys refused
    except (orjson.JSONDecodeError, strictjson.DuplicateKeys) as exc:
        raise InvalidBody(f"body is not valid JSON: {exc}") from exc


def _form(text: str) -> Body:
    # yarl's query_to_pairs is urllib's parse_qsl(keep_blank_values=True), decoding in C: a
    # GitHub form delivery (its default content type) of 13 KB took 425 us, now 36.
    fields = dict(query_to_pairs(text))
    payload = fields.get("payload")
    # GitHub's and Slack's form deliveries carry the JSON document in a `payload` field.
    if payload is not None:
        return Body(text, "utf-8", _json(payload), payload)
    return Body(text, "utf-8", fields)


def decode_body(kind: str, raw: bytes) -> Body:
    """Check and parse a body of an accepted kind; InvalidBody when it is not what it claims."""
    if kind == JSON_KIND:
        text = _utf8(raw)
        return Body(text, "utf-8", _json(raw), raw)
    if kind == FORM_KIND:
        return _form(_utf8(raw))
    try:
        return Body(raw.decode("utf-8"), "utf-8", None)
    except UnicodeDecodeError:
        return Body(base64.b64encode(raw).decode(), "base64", None)
