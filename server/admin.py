"""Admin API handlers under /api/: thin — parse, call one function, shape the answer."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ledger.errors import StreamVersionConflict
from ledger.events import JSON, EventData
from ledger.store import read_event
from projections.rebuild import rebuild
from projections.registry import PROJECTIONS
from server import queries
from server.catalog import config_of, list_triggers, public_view, read_trigger, trigger_counts
from server.codings import decoded
from server.errors import ApiError
from server.state import SERVICES, Services
from server.triggers import (
    ROTATE_FIELDS,
    STATE_EVENTS,
    check_secret,
    config_changes,
    event_for,
    generate_secret,
    new_config,
    refuse_unknown,
    registered,
    sealed_secrets,
    updated,
)

routes = web.RouteTableDef()
MAX_SEQ = 2**63 - 1


def json_response(
    value: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(value), status=status, content_type="application/json", headers=headers
    )


async def json_body(request: web.Request) -> Any:
    limit = request.app[SERVICES].settings.max_body_bytes
    raw = decoded(await request.read(), request.headers.get("Content-Encoding"), limit)
    if not raw:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from exc


async def _append_trigger_event(
    services: Services, trigger_id: str, payload: EventData, expected: int
) -> None:
    try:
        appended = await services.appender.append(
            [event_for(trigger_id, payload)], expected_version=expected
        )
    except StreamVersionConflict as exc:
        if expected == 0:
            raise ApiError(
                409, "trigger_exists", f"trigger {trigger_id!r} exists (ids are never reused)"
            ) from exc
        raise ApiError(
            409, "conflict", "the trigger changed meanwhile; read it and try again"
        ) from exc
    await services.runner.wait_for(appended[-1].seq)
    services.triggers.forget(trigger_id)


async def _trigger_row(services: Services, trigger_id: str) -> Any:
    async with services.engine.connect() as conn:
        row = await read_trigger(conn, trigger_id)
    if row is None or row.deleted:
        raise ApiError(404, "trigger_not_found", f"no trigger {trigger_id!r}")
    return row


async def _trigger_view(services: Services, trigger_id: str) -> JSON:
    row = await _trigger_row(services, trigger_id)
    async with services.engine.connect() as conn:
        counts = await trigger_counts(conn, trigger_id)
    return public_view(
        row, counts.get(trigger_id, {"received": 0, "duplicates": 0, "dead_lettered": 0})
    )


@routes.post("/api/triggers")
async def create_trigger(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    allow = services.settings.private_destinations_allowed
    config, secret = new_config(await json_body(request), services.vault, allow_private=allow)
    await _append_trigger_event(services, config["id"], registered(config), 0)
    view = await _trigger_view(services, config["id"])
    return json_response(view | ({"secret": secret} if secret else {}), 201)


@routes.get("/api/triggers")
async def get_triggers(request: web.Request) -> web.Response:
    async with request.app[SERVICES].engine.connect() as conn:
        return json_response({"triggers": await list_triggers(conn)})


@routes.get("/api/triggers/{trigger_id}")
async def get_trigger(request: web.Request) -> web.Response:
    return json_response(
        await _trigger_view(request.app[SERVICES], request.match_info["trigger_id"])
    )


@routes.patch("/api/triggers/{trigger_id}")
async def patch_trigger(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    row = await _trigger_row(services, request.match_info["trigger_id"])
    allow = services.settings.private_destinations_allowed
    changes = config_changes(await json_body(request), services.vault, allow_private=allow)
    config = config_of(row)
    if config | changes != config:  # no body, or the values it has: nothing to record
        await _append_trigger_event(services, row.id, updated(config | changes), row.version)
    return json_response(await _trigger_view(services, row.id))


@routes.post("/api/triggers/{trigger_id}/rotate-secret")
async def rotate_secret(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    row = await _trigger_row(services, request.match_info["trigger_id"])
    payload = await json_body(request)
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_trigger", "the body must be a JSON object")
    # A misspelt grace_s ({"grace": 0}, to revoke a leaked secret now) would otherwise leave the
    # old secret verifying for the default hour, answered 200.
    refuse_unknown(payload, ROTATE_FIELDS)
    grace = payload.get("grace_s", 3600)
    if (
        isinstance(grace, bool)
        or not isinstance(grace, int | float)
        or not 0 <= grace <= 30 * 86400
    ):
        raise ApiError(400, "invalid_trigger", "grace_s must be a number of seconds up to 30 days")
    secret = payload.get("secret")
    if secret is None:
        secret = generate_secret(row.source)
    if not isinstance(secret, str) or not 1 <= len(secret) <= 1024:
        raise ApiError(400, "invalid_trigger", "secret must be a string of 1 to 1024 characters")
    check_secret(row.source, secret)
    config = config_of(row)
    config["secrets"] = sealed_secrets(services.vault, secret, config["secrets"], grace)
    await _append_trigger_event(services, row.id, updated(config), row.version)
    return json_response(
        await _trigger_view(services, row.id) | {"secret": secret, "grace_s": grace}
    )


async def _change_state(request: web.Request, action: str) -> Any:
    services = request.app[SERVICES]
    row = await _trigger_row(services, request.match_info["trigger_id"])
    payload = STATE_EVENTS[action](id=row.id)  # type: ignore[call-arg]
    await _append_trigger_event(services, row.id, payload, row.version)
    return row


@routes.post("/api/triggers/{trigger_id}/pause")
async def pause_trigger(request: web.Request) -> web.Response:
    row = await _change_state(request, "pause")
    return json_response(await _trigger_view(request.app[SERVICES], row.id))


@routes.post("/api/triggers/{trigger_id}/resume")
async def resume_trigger(request: web.Request) -> web.Response:
    row = await _change_state(request, "resume")
    return json_response(await _trigger_view(request.app[SERVICES], row.id))


@routes.delete("/api/triggers/{trigger_id}")
async def delete_trigger(request: web.Request) -> web.Response:
    await _change_state(request, "delete")
    return web.Response(status=204)


@routes.get("/api/executions")
async def list_executions(request: web.Request) -> web.Response:
    async with request.app[SERVICES].engine.connect() as conn:
        return json_response(await queries.list_executions(conn, request.query))


@routes.get("/api/executions/{execution_id}")
async def get_execution(request: web.Request) -> web.Response:
    async with request.app[SERVICES].engine.connect() as conn:
        found = await queries.get_execution(conn, request.match_info["execution_id"])
    if found is None:
        raise ApiError(404, "execution_not_found", "no such execution")
    return json_response(found)


@routes.get("/api/events")
async def list_events(request: web.Request) -> web.Response:
    async with request.app[SERVICES].engine.connect() as conn:
        return json_response(await queries.list_events(conn, request.query))


@routes.get(r"/api/events/{seq:\d+}")
async def get_event(request: web.Request) -> web.Response:
    seq = int(request.match_info["seq"])
    if seq > MAX_SEQ:  # no database column holds it: no such event
        raise ApiError(404, "event_not_found", "no event at that seq")
    async with request.app[SERVICES].engine.connect() as conn:
        event = await read_event(conn, seq)
    if event is None:
        raise ApiError(404, "event_not_found", "no event at that seq")
    return json_response(queries.event_json(event))


@routes.get("/api/projections")
async def get_projections(request: web.Request) -> web.Response:
    runner = request.app[SERVICES].runner
    lag = await runner.lag()
    return json_response({"projections": [{"name": n, "lag_events": lag[n]} for n in sorted(lag)]})


@routes.post("/api/projections/{name}/rebuild")
async def rebuild_projection(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    projection = PROJECTIONS.get(request.match_info["name"])
    if projection is None:
        raise ApiError(404, "projection_not_found", f"projections: {', '.join(PROJECTIONS)}")
    result = await rebuild(services.engine, projection)
    return json_response(
        {
            "name": result.name,
            "until_seq": result.until_seq,
            "events": result.events,
            "seconds": round(result.seconds, 3),
        }
    )


__all__ = ["routes"]
