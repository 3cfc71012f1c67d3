"""Structured logs: one line per fact (`evt=… key=value`), as text or JSON, with the request id.

Values are quoted and escaped, so a payload's newlines or escape sequences never split a line.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@+")
# Whatever a payload carries, a record stays one line and cannot drive a terminal: control
# characters (C0, DEL, C1) and the Unicode line separators are written as escapes.
_UNSAFE = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_TEXT_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _UNSAFE} | {
    0x09: "\\t",
    0x0A: "\\n",
    0x0D: "\\r",
}
# orjson escapes C0 itself; the rest may stand raw in JSON text, so escape them the JSON way.
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in _UNSAFE if c >= 0x7F}


def _text(value: Any) -> str:
    text = str(value)
    if text and all(ch in _PLAIN for ch in text):
        return text
    return orjson.dumps(text).decode()  # quoted, with every control character escaped


def fact(logger: logging.Logger, evt: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured fact; the fields also travel as `extra` for the JSON formatter."""
    if not logger.isEnabledFor(level):
        return
    line = " ".join([f"evt={evt}", *(f"{k}={_text(v)}" for k, v in fields.items())])
    logger.log(level, line, extra={"evt": evt, "fields": fields})


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        evt = getattr(record, "evt", None)
        if evt:
            entry["evt"] = evt
            fields: dict[str, Any] = getattr(record, "fields", {})
            entry.update({k: v for k, v in fields.items() if k not in entry})
        rid = getattr(record, "request_id", None)
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode().translate(_JSON_ESCAPES)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        line = f"{line} request_id={rid}" if rid else line
        # Tracebacks are multi-line, and messages may carry anything: one line, always.
        return line.translate(_TEXT_ESCAPES)


def build_handler(log_format: str, stream: TextIO) -> logging.Handler:
    """A handler writing `json` or `text` lines, each stamped with the current request id."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    return handler


def configure(log_format: str = "auto", level: int = logging.INFO) -> None:
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    handler = build_handler(log_format, sys.stderr)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
