"""Every source's signature through the real receiver: accepted, refused and stored nothing,
rotated."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from conftest import AUTH, create_trigger
from signing import discord_keypair, sign, standard_secret
from test_receiver import deliveries

from ledger.signatures import SOURCES
from server.config import Settings

ALL_SOURCES = sorted(SOURCES)
# Schemes whose signature covers a timestamp in a header (tolerance 300 s).
TIMESTAMPED = {"slack", "standard", "stripe"}
# A shared token authenticates the sender, not the body.
TOKEN_SOURCES = {"evolution", "telegram"}
BODY = b'{"event":"thing.happened","data":{"n":1}}'


@dataclass(frozen=True, slots=True)
class Key:
    signing: str  # what the sender signs with
    stored: str  # what the trigger is given


def new_key(source: str) -> Key:
    if source == "discord":
        private_hex, public_hex = discord_keypair()
        return Key(private_hex, public_hex)
    secret = standard_secret() if source == "standard" else secrets.token_hex(16)
    return Key(secret, secret)


async def deliver(
    client: TestClient,  # type: ignore[type-arg]
    trigger: str,
    headers: dict[str, str],
    body: bytes = BODY,
) -> Any:
    merged = {"Content-Type": "application/json"} | headers
    return await client.post(f"/webhooks/{trigger}", data=body, headers=merged)


async def assert_refused(response: Any) -> None:
    assert response.status == 401, await response.text()
    assert (await response.json())["error"]["code"] == "invalid_signature"


@pytest.mark.parametrize("source", ALL_SOURCES)
async def test_each_source_accepts_its_signature_and_refuses_any_other(
    client: TestClient,
    settings: Settings,
    source: str,  # type: ignore[type-arg]
) -> None:
    key, other = new_key(source), new_key(source)
    await create_trigger(client, id="t", source=source, secret=key.stored)

    assert (await deliver(client, "t", sign(source, key.signing, BODY))).status == 202
    await assert_refused(await deliver(client, "t", sign(source, other.signing, BODY)))
    await assert_refused(await deliver(client, "t", {}))
    if source not in TOKEN_SOURCES:
        tampered = BODY.replace(b"1", b"2")
        await assert_refused(await deliver(client, "t", sign(source, key.signing, BODY), tampered))
    if source in TIMESTAMPED:
        stale = sign(source, key.signing, BODY, now=time.time() - 330)
        future = sign(source, key.signing, BODY, now=time.time() + 330)
        await assert_refused(await deliver(client, "t", stale))
        await assert_refused(await deliver(client, "t", future))
    assert len(await deliveries(settings)) == 1


async def test_linear_refuses_a_stale_body_timestamp(
    client: TestClient, settings: Settings
) -> None:  # type: ignore[type-arg]
    key = new_key("linear")
    await create_trigger(client, id="t", source="linear", secret=key.stored)
    # Beyond 60 s either way (by a margin for a slow machine), and well within.
    for offset_s, status in ((-90, 401), (90, 401), (-5, 202)):
        body = orjson.dumps({"webhookTimestamp": int((time.time() + offset_s) * 1000)})
        response = await deliver(client, "t", sign("linear", key.signing, body), body)
        assert response.status == status
    assert len(await deliveries(settings)) == 1


async def test_rotated_secret_keeps_working_during_the_grace_period_only(
    client: TestClient,
    settings: Settings,  # type: ignore[type-arg]
) -> None:
    old = {source: new_key(source) for source in ALL_SOURCES}
    new = {source: new_key(source) for source in ALL_SOURCES}
    for source in ALL_SOURCES:
        await create_trigger(client, id=source, source=source, secret=old[source].stored)
    grace_s = 4.0
    for source in ALL_SOURCES:
        response = await client.post(
            f"/api/triggers/{source}/rotate-secret",
            json={"secret": new[source].stored, "grace_s": grace_s},
            headers=AUTH,
        )
        assert response.status == 200, await response.text()
        assert (await response.json())["secret"] == new[source].stored  # shown once, here
        for key in (old[source], new[source]):
            assert (await deliver(client, source, sign(source, key.signing, BODY))).status == 202
    await asyncio.sleep(grace_s + 0.1)

    for source in ALL_SOURCES:
        await assert_refused(await deliver(client, source, sign(source, old[source].signing, BODY)))
        assert (
            await deliver(client, source, sign(source, new[source].signing, BODY))
        ).status == 202


async def test_old_secret_stops_at_the_end_of_grace_not_a_cache_lifetime_later(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    old, new = new_key("github"), new_key("github")
    await create_trigger(client, id="t", source="github", secret=old.stored)
    grace_s = 2.0
    asked_at = time.monotonic()  # the grace ends after asked_at + grace_s...
    response = await client.post(
        "/api/triggers/t/rotate-secret",
        json={"secret": new.stored, "grace_s": grace_s},
        headers=AUTH,
    )
    assert response.status == 200
    rotated_at = time.monotonic()  # ...and before rotated_at + grace_s
    await asyncio.sleep(max(0.0, asked_at + grace_s - 0.6 - time.monotonic()))
    # Read (and cached, for up to a second) moments before the grace ends...
    before = await deliver(client, "t", sign("github", old.signing, BODY))
    if time.monotonic() < asked_at + grace_s:  # else the machine was too slow to tell
        assert before.status == 202
    await asyncio.sleep(max(0.0, rotated_at + grace_s + 0.1 - time.monotonic()))
    # ...and refused as soon as it has ended, not when the cache entry does.
    await assert_refused(await deliver(client, "t", sign("github", old.signing, BODY)))


async def test_rotation_without_grace_drops_the_old_secret_at_once(client: TestClient) -> None:  # type: ignore[type-arg]
    old, new = new_key("github"), new_key("github")
    await create_trigger(client, id="t", source="github", secret=old.stored)
    response = await client.post(
        "/api/triggers/t/rotate-secret", json={"secret": new.stored, "grace_s": 0}, headers=AUTH
    )
    assert response.status == 200
    await assert_refused(await deliver(client, "t", sign("github", old.signing, BODY)))
    assert (await deliver(client, "t", sign("github", new.signing, BODY))).status == 202


async def test_a_generated_secret_is_shown_once_and_verifies(client: TestClient) -> None:  # type: ignore[type-arg]
    created = await create_trigger(client, id="t", source="standard", generate_secret=True)
    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert "secret" not in await (await client.get("/api/triggers/t", headers=AUTH)).json()
    assert (await deliver(client, "t", sign("standard", secret, BODY))).status == 202


def _b64(size: int) -> str:
    return base64.b64encode(secrets.token_bytes(size)).decode()


@pytest.mark.parametrize(
    ("source", "secret"),
    [
        ("standard", "not-whsec"),
        ("standard", "whsec_"),
        ("standard", "whsec_%%%not base64%%%"),
        ("standard", "whsec_" + _b64(8)),  # too short a key to be a real one
        ("discord", "not hex at all"),
        ("discord", "ab" * 31),
        ("discord", "ab" * 33),
    ],
)
async def test_a_secret_its_scheme_cannot_use_is_refused(
    client: TestClient,
    source: str,
    secret: str,  # type: ignore[type-arg]
) -> None:
    response = await client.post(
        "/api/triggers", json={"id": "t", "source": source, "secret": secret}, headers=AUTH
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_trigger"


@pytest.mark.parametrize(
    ("source", "good", "bad"),
    [
        ("standard", standard_secret(), "whsec_!!"),
        ("discord", discord_keypair()[1], "zz" * 32),
    ],
)
async def test_rotation_checks_the_new_secret_too(
    client: TestClient,
    source: str,
    good: str,
    bad: str,  # type: ignore[type-arg]
) -> None:
    await create_trigger(client, id="t", source=source, secret=good)
    response = await client.post(
        "/api/triggers/t/rotate-secret", json={"secret": bad}, headers=AUTH
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_trigger"


@pytest.mark.parametrize("padded", [True, False])
async def test_a_standard_secret_with_or_without_padding_is_accepted(
    client: TestClient,
    padded: bool,  # type: ignore[type-arg]
) -> None:
    secret = "whsec_" + _b64(16)  # 16 bytes: base64 ends with ==
    stored = secret if padded else secret.rstrip("=")
    await create_trigger(client, id="t", source="standard", secret=stored)
    assert (await deliver(client, "t", sign("standard", secret, BODY))).status == 202


async def test_a_svix_delivery_with_its_own_header_names_is_accepted_and_keyed(
    client: TestClient,
    settings: Settings,  # type: ignore[type-arg]
) -> None:
    # Svix sends svix-id, svix-timestamp and svix-signature; only accounts that have them
    # white-labelled get the webhook-* names. A retry keeps its svix-id and is signed anew.
    key = new_key("standard")
    await create_trigger(client, id="t", source="standard", secret=key.stored)
    statuses = []
    for offset_s in (0, 60):
        sent_at = time.time() - offset_s
        signed = sign("standard", key.signing, BODY, now=sent_at, extra={"webhook-id": "msg_2abc"})
        svix = {name.replace("webhook-", "svix-"): value for name, value in signed.items()}
        statuses.append((await deliver(client, "t", svix)).status)
    assert statuses == [202, 200]
    [received, duplicate] = await deliveries(settings)
    assert received.idempotency_key == duplicate.idempotency_key == "msg_2abc"
