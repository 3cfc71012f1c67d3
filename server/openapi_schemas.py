"""The JSON Schemas (2020-12, as OpenAPI 3.1 has them) of what the HTTP API takes and answers.

Request schemas say exactly what the server refuses (anything outside them is a 4xx); the server
may refuse more on meaning (an address, a secret's scheme). Answers may gain fields.
"""

from __future__ import annotations

from typing import Any

from ledger.signatures import SOURCES
from projections.trigger_executions import STATUSES
from server.policy import DEFAULT_RETRY_POLICY, MAX_ATTEMPTS, MAX_WAIT_S
from server.stats import COUNTS
from server.triggers import (
    DISCORD_KEY_PATTERN,
    MAX_RATE_PER_S,
    MAX_SECRET_LENGTH,
    STANDARD_SECRET_PATTERN,
    TRIGGER_ID_PATTERN,
)

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    return {
        "type": "object",
        "required": sorted(required),
        "properties": required | (optional or {}),
    }


STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}
TIME: Schema = {"type": "string", "format": "date-time"}
COUNT: Schema = {"type": "integer", "minimum": 0}
UUID: Schema = {"type": "string", "format": "uuid"}
SOURCE: Schema = {"type": "string", "enum": sorted(SOURCES)}
TRIGGER_ID: Schema = {"type": "string", "pattern": TRIGGER_ID_PATTERN}

_ERROR = obj(
    {"error": obj({"code": {"type": "string", "pattern": "^[a-z0-9_]+$"}, "message": STRING})}
)

_WAIT_S: Schema = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT_S}
_RETRY = {
    **obj(
        {},
        {
            "max_attempts": {"type": "integer", "minimum": 1, "maximum": MAX_ATTEMPTS},
            "base_s": _WAIT_S,
            "cap_s": _WAIT_S,
        },
    ),
    "additionalProperties": False,
    "description": (
        "cap_s is at least base_s; a field left out keeps its default "
        f"({', '.join(f'{k} {v:g}' for k, v in DEFAULT_RETRY_POLICY.to_json().items())})"
    ),
}
_RATE_LIMIT = {
    **obj(
        {"per_s": {"type": "number", "minimum": 0.001, "maximum": MAX_RATE_PER_S}},
        {"burst": {"type": "number", "minimum": 1, "maximum": MAX_RATE_PER_S}},
    ),
    "additionalProperties": False,
}
_SECRET: Schema = {"type": "string", "minLength": 1, "maxLength": MAX_SECRET_LENGTH}
_DESTINATION_IN = {
    **obj(
        {"url": {"type": "string", "minLength": 1, "maxLength": 2048}},
        {
            "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 120},
            "secret": nullable(_SECRET),
            "headers": nullable({"type": "object", "additionalProperties": STRING}),
        },
    ),
    "additionalProperties": False,
}
_CONFIG = {
    "destination": nullable(ref("DestinationInput")),
    "idempotency_key_path": nullable({"type": "string", "minLength": 1, "maxLength": 255}),
    "filter": nullable({"type": "object"}),
    "retry": nullable(ref("RetryPolicy")),
    "rate_limit": nullable(ref("RateLimit")),
}


def _secret_for(source: str, pattern: str) -> Schema:
    return {
        "if": {"properties": {"source": {"const": source}}, "required": ["source"]},
        "then": {"properties": {"secret": nullable({"type": "string", "pattern": pattern})}},
    }


_TRIGGER_CREATE = {
    **obj(
        {"id": TRIGGER_ID},
        {
            "source": SOURCE,
            "secret": nullable(_SECRET),
            "generate_secret": BOOLEAN,
            **_CONFIG,
        },
    ),
    "allOf": [
        _secret_for("standard", STANDARD_SECRET_PATTERN),
        _secret_for("discord", DISCORD_KEY_PATTERN),
    ],
    "additionalProperties": False,
}
_TRIGGER_PATCH = {
    **obj({}, _CONFIG),
    "additionalProperties": False,
    "description": (
        "Each field given replaces the trigger's (null clears it); a field left out keeps its "
        "value. Any other field is refused with 400 invalid_trigger, the read-only ones a GET "
        "shows too: the secret changes only by POST /api/triggers/{id}/rotate-secret, `paused` "
        "by POST /api/triggers/{id}/pause or /resume; `id`, `source`, `has_secret`, "
        "`created_at`, `updated_at` and `counts` never by a PATCH."
    ),
}

_TRIGGER = obj(
    {
        "id": STRING,
        "source": SOURCE,
        "has_secret": BOOLEAN,
        "destination": nullable(
            obj(
                {
                    "url": STRING,
                    "timeout_s": nullable(NUMBER),
                    "has_secret": BOOLEAN,
                    "headers": {"type": "array", "items": STRING},
                }
            )
        ),
        "idempotency_key_path": nullable(STRING),
        "filter": nullable({"type": "object"}),
        "retry": nullable(ref("RetryPolicy")),
        "rate_limit": nullable(ref("RateLimit")),
        "paused": BOOLEAN,
        "created_at": TIME,
        "updated_at": TIME,
    },
    {"counts": obj({"received": COUNT, "duplicates": COUNT, "dead_lettered": COUNT})},
)

_EXECUTION = obj(
    {
        "execution_id": STRING,
        "trigger_id": STRING,
        "idempotency_key": nullable(STRING),
        "received_event_id": STRING,
        "status": {"type": "string", "enum": list(STATUSES)},
        "attempts": COUNT,
        "error_category": nullable({"type": "string", "enum": ["transient", "permanent"]}),
        "last_error": nullable(STRING),
        "last_status_code": nullable(INTEGER),
        "next_attempt_at": nullable(TIME),
        "duplicate_count": COUNT,
        "last_duplicate_at": nullable(TIME),
        "replay_count": COUNT,
        "last_replay_at": nullable(TIME),
        "received_at": TIME,
        "completed_at": nullable(TIME),
        "last_seq": COUNT,
    },
    {"lease_until": nullable(TIME)},
)

_EVENT = obj(
    {
        "seq": {"type": "integer", "minimum": 1},
        "id": STRING,
        "stream": STRING,
        "version": {"type": "integer", "minimum": 1},
        "type": STRING,
        "trigger_id": STRING,
        "idempotency_key": nullable(STRING),
        "data": {"type": "object"},
        "meta": {"type": "object"},
        "recorded_at": TIME,
        "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    }
)

_LATENCY = {
    name: nullable(NUMBER) for name in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")
}
_STATS = obj(
    {
        "since": {"type": "string", "format": "date"},
        "until": {"type": "string", "format": "date"},
        "stats": {
            "type": "array",
            "items": obj(
                {
                    "trigger_id": STRING,
                    "day": {"type": "string", "format": "date"},
                    **dict.fromkeys(COUNTS, COUNT),
                    **_LATENCY,
                }
            ),
        },
        "totals": {
            "type": "object",
            "additionalProperties": obj(
                {
                    **dict.fromkeys(COUNTS, COUNT),
                    "dead_lettered_events": COUNT,
                    "latency_samples": COUNT,
                    **_LATENCY,
                }
            ),
        },
    }
)

_AUDIT = obj(
    {
        "ok": BOOLEAN,
        "checked": COUNT,
        "first_bad": nullable(obj({"seq": INTEGER, "reason": STRING, "message": STRING})),
        "last_good": obj({"seq": COUNT, "hash": STRING}),
    }
)

_BULK_REPLAY = {
    **obj(
        {"trigger_id": {"type": "string", "minLength": 1}},
        {
            "status": {"type": "string", "enum": ["dead_lettered", "succeeded"]},
            "since": nullable(TIME),
            "until": nullable(TIME),
            "limit": nullable({"type": "integer", "minimum": 1, "maximum": 1_000_000}),
            "dry_run": BOOLEAN,
            "requested_by": {"type": "string", "pattern": "^[\\x20-\\x7e]{1,100}$"},
        },
    ),
    "additionalProperties": False,  # any other field: 400 invalid_replay
}

SCHEMAS: dict[str, Schema] = {
    "Error": _ERROR,
    "RetryPolicy": _RETRY,
    "RateLimit": _RATE_LIMIT,
    "DestinationInput": _DESTINATION_IN,
    "TriggerCreate": _TRIGGER_CREATE,
    "TriggerPatch": _TRIGGER_PATCH,
    "RotateSecret": {
        **obj(
            {},
            {
                "secret": nullable(_SECRET),  # null or absent: a new one is generated
                "grace_s": {"type": "number", "minimum": 0, "maximum": 30 * 86400},
            },
        ),
        "additionalProperties": False,
    },
    "Trigger": _TRIGGER,
    "TriggerWithSecret": {"allOf": [ref("Trigger"), obj({}, {"secret": STRING})]},
    "RotatedTrigger": {"allOf": [ref("Trigger"), obj({"secret": STRING, "grace_s": NUMBER})]},
    "TriggerList": obj({"triggers": {"type": "array", "items": ref("Trigger")}}),
    "Execution": _EXECUTION,
    "ExecutionPage": obj(
        {
            "executions": {"type": "array", "items": ref("Execution")},
            "next_cursor": nullable(STRING),
        }
    ),
    "ExecutionDetail": {
        "allOf": [ref("Execution"), obj({"events": {"type": "array", "items": ref("Event")}})]
    },
    "Event": _EVENT,
    "EventPage": obj({"events": {"type": "array", "items": ref("Event")}, "next_after": COUNT}),
    "WebhookAccepted": obj({"event_id": UUID, "execution_id": UUID, "duplicate": {"const": False}}),
    "WebhookDuplicate": obj(
        {
            "event_id": UUID,
            "original_event_id": UUID,
            "execution_id": UUID,
            "duplicate": {"const": True},
        }
    ),
    "ReplayRequest": obj({}, {"requested_by": _BULK_REPLAY["properties"]["requested_by"]})
    | {"additionalProperties": False},  # any other field: 400 invalid_replay
    "ReplayAccepted": obj({"execution_id": STRING, "status": {"const": "pending"}}),
    "BulkReplay": _BULK_REPLAY,
    "BulkReplayAccepted": obj({"replayed": COUNT, "bulk_id": UUID}),
    "BulkReplayDryRun": obj({"would_replay": COUNT}),
    "Stats": _STATS,
    "AuditResult": _AUDIT,
    "Projections": obj(
        {"projections": {"type": "array", "items": obj({"name": STRING, "lag_events": INTEGER})}}
    ),
    "RebuildResult": obj(
        {"name": STRING, "until_seq": nullable(INTEGER), "events": COUNT, "seconds": NUMBER}
    ),
    "Health": obj({"status": {"const": "ok"}}),
    "Ready": obj(
        {"status": {"type": "string", "enum": ["ready", "not_ready"]}},
        {
            "reason": STRING,
            "projection_lag": {"type": "object", "additionalProperties": INTEGER},
            "projection_lag_seconds": {"type": "object", "additionalProperties": NUMBER},
        },
    ),
}
