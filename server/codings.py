"""Request bodies' content codings, decoded here and nowhere else: `identity`, `gzip`, `deflate`.

aiohttp's own decoding is off (`server/listener.py` runs its parser with `auto_decompress=False`):
it decoded a gzip stream as far as it went and never asked whether it had ended, so a body cut
short, in its data or in its trailer (the check of the whole), was stored as if whole. Here a
body is decoded only when every gzip member (or the one deflate stream) ends, with nothing after
it but further whole members; and never to more than the size limit, however small the encoded
body is.
"""

from __future__ import annotations

import zlib

from server.errors import ApiError, undecodable_body

# The codings a body is decoded from; any other would leave it encoded, to be refused as invalid
# JSON or stored as text nobody can read.
CODINGS = frozenset({"gzip", "deflate", "identity"})

_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS


def decoded(raw: bytes, coding: str | None, limit: int) -> bytes:
    """`raw` decoded by its Content-Encoding: 415 for a coding this server does not decode, 400
    `invalid_content_encoding` when it does not decode whole, 413 past `limit` bytes decoded."""
    name = "identity" if coding is None else coding.strip().lower()
    if name not in CODINGS:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Encoding {str(coding)[:40]!r} is not accepted: send gzip, deflate or none",
        )
    if name == "identity" or not raw:
        return raw
    if name == "gzip":
        return _inflate(raw, _GZIP_WBITS, limit, members=True)
    # "deflate" is a zlib stream (RFC 9110), but some senders send raw deflate data: told apart
    # by the zlib header's compression method (8), as aiohttp and the browsers do.
    wbits = _ZLIB_WBITS if raw[0] & 0x0F == 8 else _RAW_DEFLATE_WBITS
    return _inflate(raw, wbits, limit, members=False)


def _inflate(data: bytes, wbits: int, limit: int, *, members: bool) -> bytes:
    out = bytearray()
    rest = data
    while rest:
        stream = zlib.decompressobj(wbits)
        try:
            # At most one byte past the limit: a bomb of a few KiB is never inflated further.
            out += stream.decompress(rest, limit + 1 - len(out))
        except zlib.error:
            raise undecodable_body() from None
        if len(out) > limit:
            raise ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")
        if not stream.eof:  # the input ran out inside the stream: cut short
            raise undecodable_body()
        # Zero bytes after a member are padding (gzip(1) and Python's reader skip them too).
        rest = stream.unused_data.lstrip(b"\x00") if members else stream.unused_data
        if rest and not members:  # something after the deflate stream's end
            raise undecodable_body()
    return bytes(out)
