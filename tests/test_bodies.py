"""Form bodies (GitHub's default content type, Slack's) decode exactly as the standard library
decodes them; the decoding itself is yarl's, in C."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote_plus

import orjson
from hypothesis import assume, given
from hypothesis import strategies as st

from ledger.bodies import FORM_KIND, decode_body

# What a form body is made of, well-formed or not: separators, escapes good and bad, bytes that
# are not UTF-8 once unescaped, raw non-ASCII text.
PIECES = st.sampled_from(
    ["a", "b", "payload", "=", "&", "+", "%", "%2", "%41", "%zz", "%C3%A9", "%FF", "%e2%82%ac",
     "é", "𝄞", " ", ";", "#", "\\", "%00", "%26", "%3D", "%2B", "%25"]
)  # fmt: skip


@given(st.lists(PIECES, max_size=30).map("".join))
def test_a_form_body_decodes_as_parse_qsl_decodes_it(text: str) -> None:
    fields = dict(parse_qsl(text, keep_blank_values=True))
    assume("payload" not in fields)  # GitHub's and Slack's JSON document: the next test
    body = decode_body(FORM_KIND, text.encode())
    assert body.parsed == fields
    assert body.text == text


@given(st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=6))
def test_githubs_form_payload_is_the_json_document_it_carries(document: dict[str, str]) -> None:
    raw = orjson.dumps(document)
    body = decode_body(FORM_KIND, b"payload=" + quote_plus(raw.decode()).encode())
    assert body.parsed == document
