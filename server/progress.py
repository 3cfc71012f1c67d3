"""A terminal progress bar for long work (rebuilds, exports, verification); quiet when not a TTY."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(
        self,
        label: str,
        *,
        stream: TextIO = sys.stderr,
        min_interval_s: float = 0.2,
        unit: str = "seq",
    ) -> None:
        self._label = label
        self._unit = unit
        self._stream = stream
        self._started = time.monotonic()
        self._shown = 0.0
        self._interval = min_interval_s
        self._is_tty = stream.isatty()

    def update(self, reached: int, target: int, done: int) -> None:
        now = time.monotonic()
        if now - self._shown < self._interval and reached < target:
            return
        self._shown = now
        elapsed = max(now - self._started, 1e-9)
        share = reached / target if target else 1.0
        bar = "#" * int(share * 30)
        line = (
            f"{self._label} [{bar:<30}] {share:6.1%} {self._unit} {reached}/{target} "
            f"{done / elapsed:,.0f} ev/s"
        )
        if self._is_tty:
            self._stream.write("\r" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._is_tty:
            self._stream.write("\n")
            self._stream.flush()
