"""server/codings.py: a body is decoded whole or refused (over HTTP: tests/test_receiver.py)."""

from __future__ import annotations

import gzip
import zlib

import pytest

from server.codings import decoded
from server.errors import ApiError

TEXT = b'{"a": "' + bytes(range(65, 91)) * 40 + b'"}'


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("coding", "body", "expected"),
    [
        (None, TEXT, TEXT),
        (" Identity ", TEXT, TEXT),
        ("gzip", gzip.compress(TEXT), TEXT),
        ("GZIP", gzip.compress(TEXT), TEXT),
        # Members one after the other are one body (RFC 1952), zero padding after them none.
        ("gzip", gzip.compress(TEXT[:100]) + gzip.compress(TEXT[100:]), TEXT),
        ("gzip", gzip.compress(TEXT) + b"\x00" * 7, TEXT),
        ("deflate", zlib.compress(TEXT), TEXT),
        ("deflate", raw_deflate(TEXT), TEXT),  # what some senders call deflate
        ("gzip", b"", b""),
    ],
)
def test_a_whole_body_is_decoded(coding: str | None, body: bytes, expected: bytes) -> None:
    assert decoded(body, coding, limit=len(TEXT)) == expected


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        ("gzip", gzip.compress(TEXT)[:-1]),  # the trailer's size cut
        ("gzip", gzip.compress(TEXT)[:-8]),  # the whole trailer (CRC and size) cut
        ("gzip", gzip.compress(TEXT)[: len(gzip.compress(TEXT)) // 2]),
        ("gzip", gzip.compress(TEXT) + gzip.compress(TEXT)[:20]),  # a second member cut
        ("gzip", gzip.compress(TEXT) + b"trailing"),
        ("deflate", zlib.compress(TEXT)[:-4]),  # its Adler-32 cut
        ("deflate", zlib.compress(TEXT) + b"x"),
        ("deflate", raw_deflate(TEXT)[:-3]),
        ("gzip", TEXT),
    ],
)
def test_a_body_cut_short_or_followed_by_garbage_is_400(coding: str, body: bytes) -> None:
    with pytest.raises(ApiError) as raised:
        decoded(body, coding, limit=len(TEXT) * 2)
    assert (raised.value.status, raised.value.code) == (400, "invalid_content_encoding")


def test_a_bomb_stops_one_byte_past_the_limit() -> None:
    bomb = gzip.compress(b"\x00" * (64 << 20))  # 64 MiB in ~64 KiB
    with pytest.raises(ApiError) as raised:
        decoded(bomb, "gzip", limit=1 << 20)
    assert (raised.value.status, raised.value.code) == (413, "payload_too_large")
    # At the limit exactly, it is decoded.
    assert decoded(gzip.compress(b"x" * 1000), "gzip", limit=1000) == b"x" * 1000


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, gzip", "x-gzip"])
def test_a_coding_not_decoded_here_is_415(coding: str) -> None:
    with pytest.raises(ApiError) as raised:
        decoded(gzip.compress(TEXT), coding, limit=len(TEXT))
    assert (raised.value.status, raised.value.code) == (415, "unsupported_media_type")
