"""Structured logs: one line per fact (`evt=… key=value`), as text or JSON, with the request id;
written once per event-loop iteration, not once per line.

Values are quoted and escaped, so a payload's newlines or escape sequences never split a line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

_PLAIN = re.compile(r"[A-Za-z0-9\-_.:/@+]+")
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
# The members a JSON line writes of its own (`JsonFormatter.line`): a fact's field of one of these
# names is dropped, or (the request id, a traceback) written over.
_ENTRY_KEYS = frozenset({"ts", "level", "logger", "msg", "evt", "request_id", "exc"})


_GIVEN_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id_for(given: str | None) -> str:
    """The id of a request: the one its sender gave (X-Request-Id), when it is a plain token of at
    most 64 characters, else a new one."""
    return given if given and _GIVEN_REQUEST_ID.fullmatch(given) else new_request_id()


def new_request_id() -> str:
    """16 hex characters. A request id names a request in the logs; it guards nothing, so it
    needs no system randomness (a syscall per request)."""
    return f"{random.getrandbits(64):016x}"  # noqa: S311 - an id, not a secret


def _text(value: Any) -> str:
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return orjson.dumps(text).decode()  # quoted, with every control character escaped


def fact(logger: logging.Logger, evt: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured fact; the fields also travel as `extra` for the JSON formatter.

    When the line can only go to this process's own JSON handler (`configure`: no other handler
    or filter on the way), it is written there directly, the same line without a LogRecord and
    logging's dispatch: ~9 us of the ~17 a fact cost, paid by every duplicate delivery (SPEC
    logs each one).
    """
    if not logger.isEnabledFor(level):
        return
    handler = _sole_json_handler(logger, level)
    if handler is not None and handler.emit_fact(logger.name, level, evt, fields):
        return
    line = " ".join([f"evt={evt}", *(f"{k}={_text(v)}" for k, v in fields.items())])
    logger.log(level, line, extra={"evt": evt, "fields": fields})


def _sole_json_handler(logger: logging.Logger, level: int) -> _BatchingStreamHandler | None:
    """The one handler a record of `logger` at `level` would reach (as `Logger.callHandlers`
    walks up to the first logger that does not propagate), when it is ours with our JSON
    formatter and its request-id filter alone, and no logger on the way filters; else None."""
    found: logging.Handler | None = None
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters or node.disabled:
            return None
        if node.handlers:
            if found is not None or len(node.handlers) != 1:
                return None
            found = node.handlers[0]
        if not node.propagate:
            break
        node = node.parent
    handler = found
    if (
        type(handler) is not _BatchingStreamHandler
        or type(handler.formatter) is not JsonFormatter
        or level < handler.level
        or len(handler.filters) != 1
        or type(handler.filters[0]) is not _RequestIdFilter
    ):
        return None
    return handler


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def _escaped(line: str, escapes: dict[int, str]) -> str:
    # translate() looks each character up in a dict; most lines have nothing to escape, which
    # isprintable() tells in one scan in C (every character escaped here is a control character
    # or a line separator, none of them printable; a regex scan cost ~3 us a line).
    if line.isprintable():
        return line
    return line.translate(escapes)


def _json_safe(line: str) -> str:
    """A JSON line as orjson wrote it, made safe (`_escaped`): orjson escaped every C0 control,
    so of what is left to escape an ASCII line can hold only DEL, and a str knows whether it is
    ASCII without a scan. isprintable()'s scan of every character was 0.57 us of a duplicate's
    line (one for every duplicate delivery), this 0.06."""
    if line.isascii() and "\x7f" not in line:
        return line
    return _escaped(line, _JSON_ESCAPES)


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = (-1, "")  # the last second seen, and its date and time as text
        # a fact's members after its time, by (level, logger, message, event): code's constants
        self._shared: dict[tuple[str, str, str, str], str] = {}

    def _timestamp(self, created: float) -> str:
        """`datetime.fromtimestamp(created, UTC).isoformat()`, rounding as it does, with the text
        of each second made once."""
        fraction, whole = math.modf(created)
        micros = round(fraction * 1e6)
        if micros >= 1_000_000:
            whole, micros = whole + 1, micros - 1_000_000
        elif micros < 0:
            whole, micros = whole - 1, micros + 1_000_000
        second, text = self._second
        if second != int(whole):
            second = int(whole)
            text = datetime.fromtimestamp(second, UTC).replace(tzinfo=None).isoformat()
            self._second = (second, text)
        return f"{text}.{micros:06d}+00:00" if micros else f"{text}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        evt = getattr(record, "evt", None)
        return self.line(
            record.created,
            record.levelname,
            record.name,
            # A fact's fields are members of the line; its message (`evt=… key=value …`, for
            # text lines) would only say them again.
            f"evt={evt}" if evt else record.getMessage(),
            evt,
            getattr(record, "fields", {}) if evt else {},
            getattr(record, "request_id", None),
            self.formatException(record.exc_info) if record.exc_info else None,
        )

    def line(
        self,
        created: float,
        level_name: str,
        logger_name: str,
        message: str,
        evt: str | None,
        fields: dict[str, Any],
        rid: str | None,
        exc: str | None = None,
    ) -> str:
        """The JSON line of a record with these attributes (`fact` writes one without a record)."""
        if evt and fields and exc is None and fields.keys().isdisjoint(_ENTRY_KEYS):
            return self._fact_line(created, level_name, logger_name, message, evt, fields, rid)
        entry: dict[str, Any] = {
            "ts": self._timestamp(created),
            "level": level_name.lower(),
            "logger": logger_name,
            "msg": message,
        }
        if evt:
            entry["evt"] = evt
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if rid:
            entry["request_id"] = rid
        if exc:
            entry["exc"] = exc
        return _json_safe(orjson.dumps(entry, default=str).decode())

    def _fact_line(
        self,
        created: float,
        level_name: str,
        logger_name: str,
        message: str,
        evt: str,
        fields: dict[str, Any],
        rid: str | None,
    ) -> str:
        """`line` of a fact whose fields name none of the line's own members: the same text,
        spliced from three pieces orjson wrote — the members its level, logger and event share
        (written once), its fields, its request id. A duplicate delivery logs one (SPEC): the
        entry's dict, its merge and its whole dump were ~1.2 us of the 2.4 its line cost."""
        key = (level_name, logger_name, message, evt)
        shared = self._shared.get(key)
        if shared is None:
            members = {"level": level_name.lower(), "logger": logger_name, "msg": message}
            if len(self._shared) >= 256:  # a bound, should events ever be made up at run time
                self._shared.clear()
            shared = self._shared[key] = orjson.dumps(members | {"evt": evt}).decode()[1:-1]
        written = orjson.dumps(fields, default=str).decode()[1:-1]
        tail = "}" if not rid else f',"request_id":{orjson.dumps(rid).decode()}}}'
        return _json_safe(f'{{"ts":"{self._timestamp(created)}",{shared},{written}{tail}')


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        line = f"{line} request_id={rid}" if rid else line
        # Tracebacks are multi-line, and messages may carry anything: one line, always.
        return _escaped(line, _TEXT_ESCAPES)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _BatchingStreamHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that writes the lines an event loop's iteration logs in one write.

    On a thread running an event loop, INFO and DEBUG lines wait for a `call_soon` callback, so
    they reach the stream at the end of the loop's current iteration: a burst of requests costs
    one write, not one per line. WARNING and above, lines from threads without a running loop,
    `flush()` (logging's exit hook calls it) and the next line after a loop stopped with lines
    pending write at once, after whatever waits: the order of lines is kept.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own rule: a bad record never raises
            self.handleError(record)
            return
        self._take(line, record.levelno)

    def emit_fact(self, logger_name: str, level: int, evt: str, fields: dict[str, Any]) -> bool:
        """Write `fact`'s line as `emit` would write its record's (the formatter is our
        JsonFormatter, see `_sole_json_handler`); False when it cannot be formatted (the record's
        way then reports it as logging does)."""
        formatter = self.formatter
        assert isinstance(formatter, JsonFormatter)
        try:
            line = formatter.line(
                time.time(),
                logging.getLevelName(level),
                logger_name,
                f"evt={evt}",
                evt,
                fields,
                request_id.get(),
            )
        except Exception:  # noqa: BLE001 - e.g. an integer beyond JSON's 64 bits
            return False
        self.acquire()
        try:
            self._take(line + self.terminator, level)
        finally:
            self.release()
        return True

    def _take(self, line: str, level: int) -> None:
        """Queue `line` for the end of the loop's iteration, or write it now (see the class);
        the caller holds the lock."""
        loop = _running_loop()
        if loop is not None and level < logging.WARNING:
            if self._scheduled_on is not loop:
                self._write_pending()  # lines of a loop that stopped before writing them
                loop.call_soon(self._end_of_iteration)
                self._scheduled_on = loop
            self._pending.append(line)
            return
        self._pending.append(line)
        self._write_pending()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()

    def _end_of_iteration(self) -> None:
        self.acquire()
        try:
            self._scheduled_on = None
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> None:
        """Write the waiting lines in one go; the caller holds the lock (emit runs under it)."""
        text = "".join(self._pending)
        self._pending.clear()
        try:
            if text:
                self.stream.write(text)
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as StreamHandler.emit: report, never raise
            self.handleError(logging.makeLogRecord({"msg": text}))


def build_handler(log_format: str, stream: TextIO) -> logging.Handler:
    """A handler writing `json` or `text` lines, each stamped with the current request id."""
    handler = _BatchingStreamHandler(stream)
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
    # No format here prints them; each is a lookup (or, for the caller's file and line, a stack
    # walk) for every record. The logging HOWTO's "Optimization" names these switches.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = build_handler(log_format, sys.stderr)
    root = logging.getLogger()
    for previous in root.handlers:
        previous.flush()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
