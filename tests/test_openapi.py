"""The OpenAPI document: valid OpenAPI 3.1, and exactly the app's routes — no more, no fewer."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import AUTH, create_trigger
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from ledger.errors import InvalidIdempotencyKey
from ledger.keys import validate_key
from server.app import make_app
from server.config import Settings
from server.openapi import document
from server.policy import RetryPolicy
from server.triggers import (
    CONFIG_FIELDS,
    CREATE_FIELDS,
    DESTINATION_FIELDS,
    RATE_LIMIT_FIELDS,
    ROTATE_FIELDS,
)

METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # aiohttp answers HEAD for every GET on its own
            continue
        resource = route.resource
        assert resource is not None
        path = resource.canonical
        if isinstance(resource, web.StaticResource):
            path += "/{filename}"
        found.add((route.method.lower(), path))
    return found


def documented(spec: dict[str, object]) -> set[tuple[str, str]]:
    paths = spec["paths"]
    assert isinstance(paths, dict)
    return {(method, path) for path, item in paths.items() for method in item if method in METHODS}


@pytest.fixture
def app(tmp_path: Path) -> web.Application:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'hookledger.db'}",
        admin_token="t",
        secret_key="k",
        data_dir=tmp_path,
    )
    return make_app(settings)


def test_every_route_is_documented_and_nothing_else(app: web.Application) -> None:
    routes, spec = routes_of(app), documented(document())
    assert not routes - spec, f"routes missing from the OpenAPI document: {sorted(routes - spec)}"
    assert not spec - routes, f"documented but not routed: {sorted(spec - routes)}"


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = document()
    assert spec["openapi"].startswith("3.1")
    validate(spec)


def test_every_operation_declares_its_path_parameters() -> None:
    for path, item in document()["paths"].items():
        names = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        for method, operation in item.items():
            if method not in METHODS:
                continue
            params = item.get("parameters", []) + operation.get("parameters", [])
            declared = {p["name"] for p in params if p["in"] == "path"}
            assert declared == names, f"{method.upper()} {path}"


def test_admin_operations_need_the_token_and_every_error_has_the_error_shape() -> None:
    error = {"$ref": "#/components/schemas/Error"}
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            responses = operation["responses"]
            if path.startswith("/api/"):
                assert operation["security"] == [{"bearerAuth": []}], f"{method} {path}"
                assert {"401", "429"} <= set(responses), f"{method} {path}"
            for status, response in responses.items():
                # aiohttp's static files answer 403/404 themselves, without a body.
                if int(status) >= 400 and not path.startswith("/static/"):
                    assert response["content"]["application/json"]["schema"] == error


async def test_the_document_is_served_as_json(aiohttp_client: object, app: web.Application) -> None:
    client: TestClient = await aiohttp_client(app)  # type: ignore[operator, type-arg]
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == document()


@pytest.mark.parametrize(
    ("schema", "accepted"),
    [
        ("TriggerCreate", CREATE_FIELDS),
        ("TriggerPatch", CONFIG_FIELDS),
        ("DestinationInput", DESTINATION_FIELDS),
        ("RateLimit", RATE_LIMIT_FIELDS),
        ("RetryPolicy", {"max_attempts", "base_s", "cap_s"}),
        ("RotateSecret", ROTATE_FIELDS),
    ],
)
def test_trigger_input_schemas_take_exactly_the_fields_the_server_accepts(
    schema: str, accepted: frozenset[str]
) -> None:
    found = document()["components"]["schemas"][schema]
    assert set(found["properties"]) == set(accepted)
    assert found["additionalProperties"] is False  # the server refuses any other field


def _is_valid(schema: dict[str, Any], value: object) -> bool:
    return Draft202012Validator(schema).is_valid(value)


@pytest.mark.parametrize(
    "retry",
    [
        {"max_attempts": 1},
        {"max_attempts": 1000},
        {"max_attempts": 0},
        {"max_attempts": 1001},
        {"max_attempts": -5},
        {"base_s": 0.001, "cap_s": 0.001},
        {"base_s": 604800, "cap_s": 604800},
        {"base_s": 0},
        {"base_s": -1},
        {"cap_s": 604800.5},
        {"base_s": 1e308, "cap_s": 1e308},
    ],
)
def test_the_retry_schema_refuses_exactly_what_the_server_refuses(retry: dict[str, Any]) -> None:
    # It said any integer and any numbers: the server takes 1-1000 attempts, waits up to a week.
    try:
        RetryPolicy.from_json(retry)
        accepted = True
    except ValueError:
        accepted = False
    assert _is_valid(document()["components"]["schemas"]["RetryPolicy"], retry) == accepted


@pytest.mark.parametrize(
    "key",
    [
        "k",
        "",
        "a b~\u00a0\u00e9\u20ac",
        "a" * 255,
        "a" * 256,
        "a\x00",
        "\t",
        "\x1f",
        "\x7f",
        "\x80",
        "\x9f",
    ],
)
def test_the_idempotency_key_header_schema_refuses_exactly_what_the_receiver_refuses(
    key: str,
) -> None:
    # It said any string up to 255 characters: the receiver refuses control characters too.
    [header] = [
        p
        for p in document()["paths"]["/webhooks/{trigger_id}"]["post"]["parameters"]
        if p["name"] == "Idempotency-Key"
    ]
    try:
        validate_key(key)
        accepted = True
    except InvalidIdempotencyKey:
        accepted = False
    assert _is_valid(header["schema"], key) == accepted


async def test_an_admin_body_over_the_limit_is_a_documented_413(
    client: TestClient,  # type: ignore[type-arg]
    settings: Settings,
) -> None:
    await create_trigger(client, id="t")
    over = b'{"id": "' + b"x" * settings.max_body_bytes + b'"}'
    taking_bodies = [
        (method, path)
        for path, item in document()["paths"].items()
        for method, operation in item.items()
        if method in METHODS and "requestBody" in operation and path.startswith("/api/")
    ]
    assert len(taking_bodies) == 5
    for method, path in taking_bodies:
        concrete = path.replace("{trigger_id}", "t").replace("{execution_id}", "e")
        response = await client.request(
            method,
            concrete,
            data=io.BytesIO(over),
            headers=AUTH | {"Content-Type": "application/json"},
        )
        assert response.status == 413, (method, path, await response.text())
        assert (await response.json())["error"]["code"] == "payload_too_large"
        operation = document()["paths"][path][method]
        assert "413" in operation["responses"], f"{method} {path}: 413 is not documented"
