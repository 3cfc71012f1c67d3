"""Secrets appear in clear nowhere: not in the database files, the logs, or any answer but the one
that set them. A realistic flow runs, then everything it left behind is searched for every secret
in raw, hex and base64 forms."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import AUTH, MakeClient
from destinations import Client, Reply, start_destination
from signing import discord_keypair, sign, standard_secret

from ledger.events import TriggerRegistered
from ledger.signatures import SOURCES
from ledger.store import create_engine
from server.app import make_app
from server.config import Settings
from server.logs import JsonFormatter, TextFormatter
from server.state import SERVICES
from server.triggers import event_for

BODY = b'{"event":"paid","data":{"amount":1200}}'
JSON_TYPE = {"Content-Type": "application/json"}


@dataclass
class Recorder:
    """The client, with every answer it got kept for the search."""

    client: Client
    answers: list[tuple[str, str]] = field(default_factory=list)  # (request, answer text)
    shown_once: dict[str, str] = field(default_factory=dict)  # secret -> request that showed it

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.client.request(method, path, **kwargs)
        text = await response.text()
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.answers.append((f"{method} {path}", f"{response.status}\n{headers}\n\n{text}"))
        return response

    async def admin(
        self, method: str, path: str, json: Any = None, shows: str | None = None
    ) -> Any:
        response = await self.call(method, path, json=json, headers=AUTH)
        assert response.status < 300, await response.text()
        if shows is not None:
            self.shown_once[shows] = f"{method} {path}"
        return await response.json() if response.status != 204 else None


def forms(secret: str) -> set[str]:
    """A secret as it could leak: raw, and its bytes (and decoded key bytes) in hex and base64."""
    raw = secret.encode()
    keys = {raw}
    if secret.startswith("whsec_"):
        keys.add(base64.b64decode(secret.removeprefix("whsec_") + "=="))
        keys.add(secret.removeprefix("whsec_").encode())
    with contextlib.suppress(ValueError):
        keys.add(bytes.fromhex(secret))
    found = {secret}
    for key in keys:
        found |= {
            key.decode("latin-1"),
            key.hex(),
            key.hex().upper(),
            base64.b64encode(key).decode().rstrip("="),
            base64.urlsafe_b64encode(key).decode().rstrip("="),
        }
    return {form for form in found if len(form) >= 12}


def sqlite_text(folder: Path) -> str:
    files = sorted(folder.glob("hookledger.db*"))  # the file, its -wal and -shm
    assert any(f.name.endswith("-wal") for f in files)
    return "\n".join(f.read_bytes().decode("latin-1") for f in files)


async def database_text(settings: Settings, tmp_path: Path) -> str:
    if settings.is_sqlite:
        return sqlite_text(tmp_path)
    engine = create_engine(settings.database_url)
    chunks = []
    async with engine.connect() as conn:
        tables = await conn.execute(
            sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        )
        for (table,) in tables.all():
            rows = await conn.execute(sa.text(f'SELECT t::text FROM "{table}" t'))
            chunks.extend(row[0] for row in rows.all())
    await engine.dispose()
    return "\n".join(chunks)


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    text = TextFormatter("%(name)s %(message)s")
    as_json = JsonFormatter()
    return "\n".join(
        f"{r.getMessage()}\n{text.format(r)}\n{as_json.format(r)}" for r in caplog.records
    )


def new_secret(source: str) -> tuple[str, str]:
    """(what the sender signs with, what the trigger stores)."""
    if source == "discord":
        return discord_keypair()
    secret = standard_secret() if source == "standard" else f"{source}-{secrets.token_hex(12)}"
    return secret, secret


async def run_flow(api: Recorder, destination_url: str) -> tuple[set[str], set[str]]:
    """Triggers for every source, deliveries good and bad, dispatch with signed outbound calls,
    rotation, a destination secret changed, every read endpoint. Returns (stored secrets,
    signing-only secrets)."""
    stored: set[str] = set()
    signing_only: set[str] = set()
    executions = []
    for source in sorted(SOURCES):
        signing, secret = new_secret(source)
        destination_secret = (
            standard_secret() if source in ("github", "stripe") else secrets.token_hex(20)
        )
        stored |= {secret, destination_secret}
        if signing != secret:
            signing_only.add(signing)
        config = {
            "id": source,
            "source": source,
            "secret": secret,
            "destination": {"url": destination_url + f"/{source}", "secret": destination_secret},
        }
        await api.admin("POST", "/api/triggers", config, shows=secret)
        api.shown_once[destination_secret] = "POST /api/triggers"
        for headers in (sign(source, signing, BODY), {"X-Signature-256": "sha256=" + "0" * 64}):
            response = await api.call(
                "POST",
                f"/webhooks/{source}",
                data=BODY,
                headers={"Content-Type": "application/json"} | headers,
            )
            if response.status == 202:
                executions.append((await response.json())["execution_id"])
        # Rotate: once with a secret given, once generated (shown once in the answer).
        signing, secret = new_secret(source)
        stored.add(secret)
        if signing != secret:
            signing_only.add(signing)
        await api.admin(
            "POST",
            f"/api/triggers/{source}/rotate-secret",
            {"secret": secret, "grace_s": 60},
            shows=secret,
        )
        response = await api.call(
            "POST",
            f"/webhooks/{source}",
            data=BODY,
            headers={"Content-Type": "application/json"} | sign(source, signing, BODY),
        )
        assert response.status == 202
        executions.append((await response.json())["execution_id"])
        if source != "discord":
            rotated = await api.admin("POST", f"/api/triggers/{source}/rotate-secret", {})
            stored.add(rotated["secret"])
            api.shown_once[rotated["secret"]] = f"POST /api/triggers/{source}/rotate-secret"
        new_destination_secret = secrets.token_urlsafe(24)
        stored.add(new_destination_secret)
        await api.admin(
            "PATCH",
            f"/api/triggers/{source}",
            {
                "destination": {
                    "url": destination_url + f"/{source}",
                    "secret": new_destination_secret,
                }
            },
            shows=new_destination_secret,
        )
    await wait_dispatched(api, executions)
    for path in (
        "/api/triggers",
        "/api/triggers/github",
        "/api/executions?limit=100",
        f"/api/executions/{executions[0]}",
        "/api/events?limit=1000",
        "/api/stats?days=2",
        "/api/audit/verify",
        "/api/projections",
    ):
        await api.admin("GET", path)
    await api.admin("POST", "/api/projections/triggers/rebuild")
    await api.call("GET", "/metrics")
    return stored, signing_only


async def wait_dispatched(api: Recorder, executions: list[str], within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    for execution_id in executions:
        while True:
            response = await api.call("GET", f"/api/executions/{execution_id}", headers=AUTH)
            if response.status == 200 and (await response.json())["status"] in (
                "succeeded",
                "dead_lettered",
            ):
                break
            assert time.monotonic() < deadline, f"execution {execution_id} not dispatched"
            await asyncio.sleep(0.05)


async def test_no_secret_is_in_the_database_the_logs_or_any_answer_but_the_one_that_set_it(
    aiohttp_client: MakeClient,
    aiohttp_server: Any,
    settings: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    dispatching = replace(settings, dispatch=True, dispatch_poll_s=0.05, lease_s=2.0)
    async for destination in start_destination(aiohttp_server):
        destination.script("/github", Reply(500), Reply(200))  # a failed attempt logs too
        api = Recorder(await aiohttp_client(make_app(dispatching)))
        stored, signing_only = await run_flow(api, destination.url("").rstrip("/"))
        # The outbound calls were really signed with the destination secrets.
        assert any("webhook-signature" in r.headers for r in destination.received)
        database = await database_text(settings, tmp_path)

    logs = log_text(caplog)
    assert "evt=" in logs and len(database) > 1000  # the search looked at something
    for secret in sorted(stored | signing_only):
        for form in forms(secret):
            assert form not in database, f"a form of a secret is in the database: {form!r}"
            assert form not in logs, f"a form of a secret is in the logs: {form!r}"
            showing = [request for request, answer in api.answers if form in answer]
            allowed = (
                [api.shown_once[secret]] if secret in api.shown_once and form in secret else []
            )
            assert len(showing) <= len(allowed) and set(showing) <= set(allowed), (
                f"a form of a secret is in answers to {showing}: {form!r}"
            )


def test_the_search_forms_cover_raw_hex_and_base64() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    found = forms(secret)
    assert secret in found
    assert (b"k" * 24).hex() in found
    assert base64.b64encode(secret.encode()).decode().rstrip("=") in found
    assert binascii.hexlify(secret.encode()).decode() in found


async def test_a_destination_header_value_is_sent_yet_kept_and_shown_nowhere(
    aiohttp_client: MakeClient, aiohttp_server: Any, settings: Settings, tmp_path: Path
) -> None:
    # A GET shows a destination's headers by name only, for their values are most often the
    # destination's own credentials; the log (`GET /api/events`) and the database held them.
    credential = f"Bearer dest-token-{secrets.token_hex(16)}"
    dispatching = replace(settings, dispatch=True, dispatch_poll_s=0.05, lease_s=2.0)
    async for destination in start_destination(aiohttp_server):
        api = Recorder(await aiohttp_client(make_app(dispatching)))
        headers = {"Authorization": credential, "X-Team": "ops"}
        config = {"id": "h", "destination": {"url": destination.url("/h"), "headers": headers}}
        await api.admin("POST", "/api/triggers", config)
        response = await api.call("POST", "/webhooks/h", data=BODY, headers=JSON_TYPE)
        assert response.status == 202
        await wait_dispatched(api, [(await response.json())["execution_id"]])
        assert [r.headers.get("Authorization") for r in destination.received] == [credential]
        shown = await api.admin("GET", "/api/triggers/h")
        assert shown["destination"]["headers"] == ["Authorization", "X-Team"]
        patch = {"destination": {"url": destination.url("/h"), "headers": {"X-Team": "ops"}}}
        await api.admin("PATCH", "/api/triggers/h", patch)
        for path in ("/api/triggers", "/api/events?limit=1000", "/api/events/1"):
            await api.admin("GET", path)
        database = await database_text(settings, tmp_path)
    secret = credential.removeprefix("Bearer ")
    assert secret not in database
    assert [request for request, answer in api.answers if secret in answer] == []


async def test_a_destination_whose_headers_were_kept_in_clear_still_sends_them(
    aiohttp_client: MakeClient, aiohttp_server: Any, settings: Settings
) -> None:
    dispatching = replace(settings, dispatch=True, dispatch_poll_s=0.05, lease_s=2.0)
    async for destination in start_destination(aiohttp_server):
        app = make_app(dispatching)
        api = Recorder(await aiohttp_client(app))
        services = app[SERVICES]
        before = {"url": destination.url("/old"), "timeout_s": 5.0, "headers": {"X-Team": "ops"}}
        registered = TriggerRegistered(id="old", source="generic", destination=before)
        appended = await services.appender.append([event_for("old", registered)])
        await services.runner.wait_for(appended[-1].seq)
        shown = await api.admin("GET", "/api/triggers/old")
        assert shown["destination"]["headers"] == ["X-Team"]
        response = await api.call("POST", "/webhooks/old", data=BODY, headers=JSON_TYPE)
        assert response.status == 202
        await wait_dispatched(api, [(await response.json())["execution_id"]])
        assert [r.headers.get("X-Team") for r in destination.received] == ["ops"]
