"""`GET /openapi.json`: the OpenAPI 3.1 document of every route the app serves.

tests/test_openapi.py holds it to the router (every route documented, nothing extra) and to the
OpenAPI schema; CI fuzzes the running server against it with schemathesis.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from aiohttp import web

from ledger.keys import CONTROL_CHARACTERS, MAX_KEY_LENGTH
from projections.registry import PROJECTIONS
from server.openapi_schemas import COUNT, SCHEMAS, STRING, TIME, TRIGGER_ID, ref

__all__ = ["document", "get_openapi"]

Operation = dict[str, Any]
_JSON = "application/json"
_ADMIN = "Admin API: `Authorization: Bearer <admin token>`."


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": ref("Error")}}}


def _json(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}, **extra}


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
ERRORS = {
    400: _error(
        "invalid input (`invalid_json`, `invalid_content_encoding`, `invalid_trigger`,"
        " `invalid_query`, …)"
    ),
    401: _error("`unauthorized`: no or wrong admin token"),
    404: _error("not found (`trigger_not_found`, `execution_not_found`, …)"),
    408: _error("`request_timeout`: the body did not arrive in time; the connection is closed"),
    409: _error(
        "conflict (`trigger_exists`, `conflict`, `replay_not_allowed`, `rebuild_in_progress`)"
    ),
    413: _error("`payload_too_large`"),
    415: _error("`unsupported_media_type`"),
    429: _error("`rate_limited`") | {"headers": _RETRY_AFTER},
    503: _error("`storage_unavailable` (retry later) or `not_ready`") | {"headers": _RETRY_AFTER},
}


def _responses(ok: dict[int, Any], errors: tuple[int, ...]) -> dict[str, Any]:
    merged = {status: ERRORS[status] for status in errors} | ok
    return {str(status): merged[status] for status in sorted(merged)}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    # Every query reader takes an empty value (`?limit=`) as not given.
    either = {"anyOf": [schema, {"type": "string", "const": ""}]}
    return {"name": name, "in": "query", "required": False, "schema": either} | (
        {"description": description} if description else {}
    )


def _path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or STRING}


def _body(schema_name: str, *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {_JSON: {"schema": ref(schema_name)}}}


def admin(
    summary: str,
    ok: dict[int, Any],
    errors: tuple[int, ...] = (),
    *,
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> Operation:
    """An /api/ operation: bearer token, per-client limit, and a database behind it; one that
    takes a body refuses one over HOOKLEDGER_MAX_BODY_BYTES (413), as the receiver does."""
    if body is not None:
        errors = (*errors, 413)
    operation: Operation = {
        "summary": summary,
        "description": _ADMIN,
        "tags": ["admin"],
        "security": [{"bearerAuth": []}],
        "parameters": parameters or [],
        "responses": _responses(ok, (401, 429, 503, *errors)),
    }
    if body is not None:
        operation["requestBody"] = body
    return operation


def public(summary: str, responses: dict[str, Any], tag: str = "operations") -> Operation:
    return {"summary": summary, "tags": [tag], "security": [], "responses": responses}


_LIMIT = {"type": "integer", "minimum": 1, "maximum": 1000}
_TRIGGER_PARAM = _path("trigger_id", TRIGGER_ID)
_EXECUTION_PARAM = _path("execution_id")
_TRIGGER_OK = {200: _json("the trigger", ref("Trigger"))}


def _receiver() -> Operation:
    content = {
        _JSON: {"schema": {}},
        "application/x-www-form-urlencoded": {"schema": {"type": "object"}},
        "text/plain": {"schema": {"type": "string"}},
    }
    return {
        "summary": "Receive a webhook delivery",
        "description": (
            "No admin token: the trigger's signature scheme authenticates (see the sources table"
            " in SPEC.md). Also accepts `application/*+json`. The body is stored exactly as"
            " received; the answer is sent once it is committed."
        ),
        "tags": ["receiver"],
        "security": [],
        "parameters": [
            _TRIGGER_PARAM,
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "longer, or with a control character: 400 invalid_idempotency_key",
                "schema": {
                    "type": "string",
                    "maxLength": MAX_KEY_LENGTH,
                    "pattern": f"^[^{CONTROL_CHARACTERS}]*$",  # ledger/keys.py's check
                },
            },
        ],
        "requestBody": {"required": True, "content": content},
        "responses": _responses(
            {
                202: _json("a new delivery, recorded", ref("WebhookAccepted")),
                200: _json(
                    "a repeated delivery (same idempotency key)",
                    ref("WebhookDuplicate"),
                    headers={"Idempotent-Replayed": {"schema": {"const": "true"}}},
                ),
                401: _error("`invalid_signature`"),
            },
            (400, 404, 408, 413, 415, 429, 503),
        ),
    }


def _trigger_paths() -> dict[str, Any]:
    view = _json("the trigger", ref("Trigger"))
    return {
        "/api/triggers": {
            "get": admin("List triggers", {200: _json("triggers", ref("TriggerList"))}),
            "post": admin(
                "Register a trigger (its secret is shown in this answer only)",
                {201: _json("registered", ref("TriggerWithSecret"))},
                (400, 409),
                body=_body("TriggerCreate"),
            ),
        },
        "/api/triggers/{trigger_id}": {
            "parameters": [_TRIGGER_PARAM],
            "get": admin("Read a trigger", {200: view}, (404,)),
            "patch": admin(
                "Change a trigger (no body: no change)",
                {200: view},
                (400, 404, 409),
                body=_body("TriggerPatch", required=False),
            ),
            "delete": admin("Delete a trigger", {204: {"description": "deleted"}}, (404, 409)),
        },
        "/api/triggers/{trigger_id}/rotate-secret": {
            "parameters": [_TRIGGER_PARAM],
            "post": admin(
                "Rotate the secret; the previous one verifies for grace_s more (default 3600)",
                {200: _json("the new secret, shown once", ref("RotatedTrigger"))},
                (400, 404, 409),
                body=_body("RotateSecret", required=False),
            ),
        },
        "/api/triggers/{trigger_id}/pause": {
            "parameters": [_TRIGGER_PARAM],
            "post": admin("Hold dispatch (deliveries are still recorded)", {200: view}, (404, 409)),
        },
        "/api/triggers/{trigger_id}/resume": {
            "parameters": [_TRIGGER_PARAM],
            "post": admin("Resume dispatch", {200: view}, (404, 409)),
        },
    }


def _execution_paths() -> dict[str, Any]:
    statuses = SCHEMAS["Execution"]["properties"]["status"]
    categories = {"type": "string", "enum": ["transient", "permanent"]}
    return {
        "/api/executions": {
            "get": admin(
                "List executions, newest first; page with next_cursor",
                {200: _json("a page", ref("ExecutionPage"))},
                (400,),
                parameters=[
                    _query("trigger_id", STRING),
                    _query("status", statuses),
                    _query("error_category", categories),
                    _query("key", STRING, "part of the idempotency key"),
                    _query("since", TIME, "received at or after"),
                    _query("until", TIME, "received before"),
                    _query("order", {"type": "string", "enum": ["asc", "desc"]}),
                    _query("limit", _LIMIT),
                    _query("cursor", STRING, "the next_cursor of the previous page"),
                ],
            ),
        },
        "/api/executions/{execution_id}": {
            "parameters": [_EXECUTION_PARAM],
            "get": admin(
                "An execution and its whole timeline",
                {200: _json("the execution", ref("ExecutionDetail"))},
                (404,),
            ),
        },
        "/api/executions/{execution_id}/replay": {
            "parameters": [_EXECUTION_PARAM],
            "post": admin(
                "Replay a finished execution",
                {202: _json("replay requested", ref("ReplayAccepted"))},
                (400, 404, 409),
                body=_body("ReplayRequest", required=False),
            ),
        },
        "/api/replays": {
            "post": admin(
                "Replay a trigger's dead letters (or succeeded executions) in bulk",
                {
                    202: _json("replays requested", ref("BulkReplayAccepted")),
                    200: _json("dry run: how many would be replayed", ref("BulkReplayDryRun")),
                },
                (400, 404, 409),
                body=_body("BulkReplay"),
            ),
        },
    }


def _event_paths() -> dict[str, Any]:
    after = _query("after", COUNT, "the seq to read after")
    types = _query("type", STRING, "event types, comma-separated; the parameter may repeat")
    trigger = _query("trigger_id", STRING)
    stream = {
        "description": "Server-Sent Events, one `data:` line per event (an Event as JSON)",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    return {
        "/api/events": {
            "get": admin(
                "Read the log by seq",
                {200: _json("a page", ref("EventPage"))},
                (400,),
                parameters=[after, _query("limit", _LIMIT), types, trigger],
            ),
        },
        "/api/events/{seq}": {
            "get": admin(
                "One event",
                {200: _json("the event", ref("Event"))},
                (404,),
                parameters=[_path("seq", {"type": "string", "pattern": "^[0-9]+$"})],
            ),
        },
        "/api/events/stream": {
            "get": admin(
                "Follow the log live; resumes from Last-Event-ID",
                {200: stream},
                (400,),
                parameters=[
                    after,
                    types,
                    trigger,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": "a seq, at most 2^62, as `after` (400 invalid_query else)",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
                    },
                ],
            ),
        },
    }


def _reader_paths() -> dict[str, Any]:
    return {
        "/api/stats": {
            "get": admin(
                "Per trigger and UTC day: counts and dispatch latency",
                {200: _json("stats", ref("Stats"))},
                (400,),
                parameters=[
                    _query("days", {"type": "integer", "minimum": 1, "maximum": 3660}),
                    _query("trigger_id", STRING),
                ],
            ),
        },
        "/api/audit/verify": {
            "get": admin(
                "Recompute the hash chain, from the genesis or a checkpoint (both or neither)",
                {200: _json("the verdict", ref("AuditResult"))},
                (400,),
                parameters=[
                    _query("from_seq", {"type": "integer", "minimum": 0, "maximum": 2**62}),
                    _query("from_hash", {"type": "string", "pattern": "^[0-9a-f]{64}$"}),
                ],
            ),
        },
        "/api/projections": {
            "get": admin("Projections and their lag", {200: _json("lag", ref("Projections"))}),
        },
        "/api/projections/{name}/rebuild": {
            "post": admin(
                "Rebuild a projection from the log",
                {200: _json("rebuilt", ref("RebuildResult"))},
                (404, 409),
                parameters=[_path("name", {"type": "string", "enum": sorted(PROJECTIONS)})],
            ),
        },
    }


def _operation_paths() -> dict[str, Any]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "/healthz": {
            "get": public("The process is up", {"200": _json("up", ref("Health"))}),
        },
        "/readyz": {
            "get": public(
                "The database answers and the projections keep up",
                {"200": _json("ready", ref("Ready")), "503": ERRORS[503]},
            ),
        },
        "/metrics": {
            "get": public(
                "Prometheus metrics",
                {"200": {"description": "text exposition format", "content": text}},
            ),
        },
        "/openapi.json": {
            "get": public(
                "This document", {"200": _json("OpenAPI 3.1", {"type": "object"})}, "meta"
            ),
        },
        "/": {
            "get": public(
                "The dashboard",
                {
                    "200": {
                        "description": "the page",
                        "content": {"text/html": {"schema": STRING}},
                    },
                    "404": ERRORS[404],
                },
                "dashboard",
            ),
        },
        "/static/{filename}": {
            "get": public(
                "The dashboard's files",
                {
                    "200": {"description": "a file"},
                    # aiohttp's static files answer these itself, without a body.
                    "403": {"description": "not a file that may be served"},
                    "404": {"description": "no such file"},
                },
                "dashboard",
            )
            | {"parameters": [_path("filename")]},
        },
    }


@functools.cache
def document() -> dict[str, Any]:
    """The whole OpenAPI document (built once)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hookledger",
            "version": "0.1.0",
            "description": (
                "Event-sourced webhook ledger. Every error is "
                '`{"error": {"code": "<snake_case>", "message": "<human text>"}}`.'
            ),
        },
        "paths": {
            "/webhooks/{trigger_id}": {"post": _receiver()},
            **_trigger_paths(),
            **_execution_paths(),
            **_event_paths(),
            **_reader_paths(),
            **_operation_paths(),
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


@functools.cache
def _document_bytes() -> bytes:
    return orjson.dumps(document())


async def get_openapi(_request: web.Request) -> web.Response:
    return web.Response(body=_document_bytes(), content_type=_JSON)
