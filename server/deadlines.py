"""Time limits on a connection, the same on both lanes (the fast lane, server/fastlane.py, and
aiohttp's, server/listener.py): a request head's deadline (`Deadline`), the 408 written to a
connection that began a head and missed it, and how long a connection lingers after an answer
given before its body was read whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

__all__ = ["HEAD_TIMEOUT_RESPONSE", "LINGERING_S", "Deadline"]

# After an answer given before the body was read whole (a body's 408), the connection goes on
# reading and dropping what comes this long, so the sender can read the answer; then it closes.
LINGERING_S = 2.0

# Written straight to the socket: no request exists when the head never completed.
_HEAD_TIMEOUT_BODY = orjson.dumps(
    {"error": {"code": "request_timeout", "message": "the request head took too long"}}
)
HEAD_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_HEAD_TIMEOUT_BODY)
) + _HEAD_TIMEOUT_BODY


class Deadline:
    """A deadline moved often and cheaply (one per request head): one timer, moved lazily —
    when it fires before the deadline, it is set again for it. `on_due` runs once it is over."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_due: Callable[[], None]) -> None:
        self._loop = loop
        self._on_due = on_due
        self.due: float | None = None  # loop time; None: disarmed
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, timeout_s: float) -> None:
        due = self.due = self._loop.time() + timeout_s
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._fire, due)

    def disarm(self) -> None:
        self.due = None

    def cancel(self) -> None:
        self.due = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self, set_for: float) -> None:
        self._timer = None
        due = self.due
        if due is None:
            return
        if due > set_for:  # moved since this timer was set
            self._timer = self._loop.call_at(due, self._fire, due)
            return
        self.due = None
        self._on_due()
