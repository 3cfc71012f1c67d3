"""The one middleware around every request: its id, the admin API's gate, the documented error
shape, the receiver's outcomes, and the dashboard's caching and content policy.

One layer rather than one per concern: aiohttp runs each layer as a partial and a coroutine of its
own, a fair share of what a webhook costs. Inside, the order is the layers' order: the request id
around everything (errors are logged with it); the admin rate limit before the token check; and
the outcome counted on the answer the sender gets, after any error became one. An admin
request's path and query parameters are refused here when they hold a NUL (see _refuse_nul).
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Middleware

from server.errors import ApiError, Handler, error_answer
from server.logs import request_id, request_id_for
from server.monitoring import record_outcome
from server.ratelimit import limit_admin
from server.state import SERVICES

__all__ = ["make_middleware"]

DASHBOARD_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _dashboard_headers(path: str, response: web.StreamResponse) -> None:
    # Revalidated on every load, so an upgraded server never runs yesterday's modules; the page
    # runs only its own scripts and styles and is never framed (it holds the admin token).
    response.headers["Cache-Control"] = "no-cache"
    if path == "/":
        response.headers["Content-Security-Policy"] = DASHBOARD_CSP


def _check_admin_token(request: web.Request) -> None:
    expected = request.app[SERVICES].admin_token
    if not expected:
        # An empty token file reads as the token "", which a bare "Bearer" would match: the
        # API stays shut until there is a real token, never open to anyone.
        raise ApiError(
            401,
            "unauthorized",
            "this server's admin token is empty: set HOOKLEDGER_ADMIN_TOKEN, or delete the empty "
            "hookledger.token and restart to have one generated",
        )
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    # surrogateescape: the bytes sent, even when they are not UTF-8 (aiohttp decoded them so).
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), expected.encode()
    ):
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <admin token>")


def _refuse_nul(request: web.Request) -> None:
    """A NUL character has no place in an admin path or query parameter, and PostgreSQL text
    cannot hold one: refused here, once, before any handler passes it to the database."""
    if "\x00" in request.path:
        raise ApiError(400, "bad_request", "the path must not contain a NUL character (%00)")
    for name, value in request.query.items():
        if "\x00" in name or "\x00" in value:
            raise ApiError(
                400, "invalid_query", "query parameters must not contain a NUL character (%00)"
            )


def make_middleware(admin_rate_per_s: float, admin_rate_burst: float) -> Middleware:
    """The middleware; `admin_rate_per_s` <= 0 turns the admin API's rate limit off."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request_id_for(request.headers.get("X-Request-Id"))
        token = request_id.set(rid)
        try:
            path = request.path
            try:
                if path.startswith("/api/"):
                    limit_admin(request, admin_rate_per_s, admin_rate_burst)
                    _check_admin_token(request)
                    _refuse_nul(request)
                response = await handler(request)
            except Exception as exc:  # noqa: BLE001 - error_answer shapes any error, or re-raises
                response = error_answer(request, exc)
            if path.startswith("/webhooks/"):
                record_outcome(request, response)
            elif path == "/" or path.startswith("/static/"):
                _dashboard_headers(path, response)
            response.headers["X-Request-Id"] = rid
            return response
        finally:
            request_id.reset(token)

    return middleware
