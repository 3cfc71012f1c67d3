"""The server's errors and the one place that turns any error into the documented HTTP shape.

ApiError(status, code, message)       raised by handlers for documented outcomes
ledger.errors.*, projections.errors.*  mapped by `error_answer` (see _DOCUMENTED_ERRORS)
a body its coding does not decode     400 invalid_content_encoding (`undecodable_body`)
anything else                          500 internal_error, logged with its cause

`error_answer` is called by the request middleware (server.middleware) for whatever a handler
raised; `documented` is the same mapping for the listener's fast lane (server/fastlane.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import orjson
from aiohttp import web

from ledger import errors as ledger_errors
from ledger.appender import is_unavailable
from projections import errors as projection_errors
from server.logs import fact

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.close = close  # answer, then close the connection (its request was not read whole)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = error_body(code, message)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


_DOCUMENTED_ERRORS: dict[type[Exception], tuple[int, str]] = {
    ledger_errors.InvalidIdempotencyKey: (400, "invalid_idempotency_key"),
    ledger_errors.InvalidBody: (400, "invalid_json"),
    ledger_errors.InvalidSignature: (401, "invalid_signature"),
    ledger_errors.DuplicateTrigger: (409, "trigger_exists"),
    ledger_errors.StreamVersionConflict: (409, "conflict"),
    projection_errors.RebuildInProgress: (409, "rebuild_in_progress"),
}

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    400: "bad_request",
    431: "headers_too_large",
}


def _from_http(exc: web.HTTPException) -> web.Response:
    code = _HTTP_CODES.get(exc.status, "http_error")
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return error_response(exc.status, code, exc.reason or code, headers)


def error_answer(request: web.Request, exc: Exception) -> web.Response:
    """The documented answer to what a handler raised. An HTTPException below 400 (a redirect,
    say) is an answer, not an error: it is raised again for aiohttp to send."""
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return _from_http(exc)
    error = documented(exc, request.path)
    response = error_response(error.status, error.code, error.message, error.headers)
    if error.close:
        response.force_close()
    return response


def documented(exc: Exception, path: str) -> ApiError:
    """The documented error for `exc` (any exception but aiohttp's own HTTPException), logged
    when it is an outage or an internal error."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, web.RequestPayloadError):  # raised by request.read()
        return undecodable_body()
    if isinstance(exc, ledger_errors.StorageUnavailable):
        return _unavailable(exc.cause)
    if isinstance(exc, ledger_errors.LedgerError | projection_errors.ProjectionError):
        for kind, (status, code) in _DOCUMENTED_ERRORS.items():
            if isinstance(exc, kind):
                return ApiError(status, code, str(exc))
        return _internal(path, exc)
    if is_unavailable(exc):
        # A read that cannot reach the database (the trigger lookup, say) is a 503 too:
        # the sender retries, and nothing was acknowledged.
        return _unavailable(exc)
    return _internal(path, exc)


def undecodable_body() -> ApiError:
    """The answer to a body its Content-Encoding does not decode (server/codings.py: gzip or
    deflate data that is not, or is cut short), or whose chunked framing aiohttp could not read
    (RequestPayloadError). The client's mistake, not ours; the connection is closed."""
    return ApiError(
        400,
        "invalid_content_encoding",
        "the body cannot be decoded by its Content-Encoding: send gzip or deflate, or none",
        close=True,
    )


def _internal(path: str, exc: Exception) -> ApiError:
    logger.error("evt=internal_error path=%s", path, exc_info=exc)
    return ApiError(500, "internal_error", "an internal error occurred; it has been logged")


def _unavailable(cause: BaseException) -> ApiError:
    fact(logger, "storage_unavailable", logging.WARNING, cause=repr(cause))
    return ApiError(
        503,
        "storage_unavailable",
        "the database is unavailable; retry later",
        headers={"Retry-After": "5"},
    )
