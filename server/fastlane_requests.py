"""Which requests are the fast lane's (server/fastlane.py): aiohttp's limits on a head, the
webhook path, the headers that make a head aiohttp's; and a webhook POST whose head is complete,
its body arriving behind it.
"""

from __future__ import annotations

import asyncio
import re

from aiohttp.http_parser import SINGLETON_HEADERS

from server.receiver import Head, within_body_timeout

# aiohttp's limits on a head (RequestHandler's defaults): a head beyond them is aiohttp's to refuse.
MAX_LINE = 8190
MAX_HEADERS = 128
MAX_HEAD_BYTES = 2 * MAX_LINE + 64  # unfinished and this long: aiohttp's (it answers 431)

_PATH = re.compile(rb"/webhooks/([A-Za-z0-9_~-][A-Za-z0-9._~-]*)(?:\?[^#]*)?")
_HANDED_OVER = frozenset([b"transfer-encoding", b"content-encoding", b"expect", b"upgrade"])
# Headers aiohttp refuses to see twice (400): such a request is aiohttp's to refuse.
_SINGLETONS = frozenset(name.encode() for name in SINGLETON_HEADERS)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # as aiohttp decodes header names and values


def _plain_headers(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes] | None:
    """Each header's first value by lower-case name, when the head is plain enough for the lane;
    None when it is aiohttp's: a name or value over its limit, a body encoded or to be continued
    (Expect), an upgrade, a singleton header repeated (aiohttp's 400), no Host (HTTP/1.1's 400)."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if len(name) > MAX_LINE or len(value) > MAX_LINE:
            return None
        lower = name.lower()
        if lower in _HANDED_OVER:
            return None
        if lower not in found:
            found[lower] = value
        elif lower in _SINGLETONS:
            return None
    return found if b"host" in found else None


class _Request:
    """A webhook POST whose head is complete; its body arrives behind it."""

    __slots__ = ("_waiter", "body", "head", "keep_alive", "parts", "path", "request_id")

    def __init__(self, head: Head, path: str, rid: str | None, keep_alive: bool) -> None:
        self.head = head
        self.path = path
        self.request_id = rid
        self.keep_alive = keep_alive
        self.parts: list[bytes] = []
        self.body: bytes | None = None  # once complete
        self._waiter: asyncio.Future[bytes] | None = None

    def complete(self) -> None:
        self.body = b"".join(self.parts)
        self.parts = []
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(self.body)

    def fail(self, exc: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    async def read(self, timeout_s: float) -> bytes:
        if self.body is not None:
            return self.body
        # Still arriving: `complete` gives it to the waiter, if it comes in time.
        self._waiter = asyncio.get_running_loop().create_future()
        return await within_body_timeout(self._waiter, timeout_s)
