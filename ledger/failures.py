"""A background loop's repeated failure, logged so that an outage reads as one story.

A loop that retries every second (the dispatcher, the projector) while the database is away
would log a traceback a second. Here: the first failure with its traceback, then one line every
`every_s` saying how long and how often, and one line when it works again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class FailureLog:
    def __init__(
        self,
        logger: logging.Logger,
        evt: str,
        *,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._evt = evt
        self._every_s = every_s
        self._clock = clock
        self._since: float | None = None  # when the current run of failures began
        self._failures = 0
        self._last_line = 0.0

    def failed(self, exc: BaseException) -> None:
        now = self._clock()
        self._failures += 1
        if self._since is None:
            self._since = self._last_line = now
            self._logger.error("evt=%s cause=%r", self._evt, exc, exc_info=exc)
        elif now - self._last_line >= self._every_s:
            self._last_line = now
            self._logger.warning(
                "evt=%s failures=%d for_s=%.0f cause=%r",
                self._evt,
                self._failures,
                now - self._since,
                exc,
            )

    def succeeded(self) -> None:
        if self._since is None:
            return
        self._logger.warning(
            "evt=%s_recovered failures=%d after_s=%.1f",
            self._evt,
            self._failures,
            self._clock() - self._since,
        )
        self._since, self._failures = None, 0
