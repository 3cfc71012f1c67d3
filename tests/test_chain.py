"""The hash chain's audit on both backends: untouched, tampered with by a superuser, cut short."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from conftest import AUTH, create_trigger
from sqlalchemy.ext.asyncio import AsyncEngine
from traffic import deliver, run_cli

from ledger.chain import CHECKPOINT_MISMATCH, GAP, HASH_MISMATCH, Checkpoint, verify_chain
from ledger.store import create_engine, read_events
from server.config import Settings


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url)
    yield engine
    await engine.dispose()


async def fill(client: TestClient, n: int = 12) -> None:  # type: ignore[type-arg]
    await create_trigger(client, id="t")
    for i in range(n):
        await deliver(client, "t", f'{{"i": {i}}}', key=f"k{i % 9}")


async def tamper(engine: AsyncEngine, statement: str) -> None:
    """What an attacker with superuser access does: switch the append-only guard off, write."""
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(sa.text("ALTER TABLE events DISABLE TRIGGER events_append_only"))
        else:
            await conn.execute(sa.text("DROP TRIGGER events_no_update"))
            await conn.execute(sa.text("DROP TRIGGER events_no_delete"))
        await conn.execute(sa.text(statement))


async def test_untouched_log_verifies(client: TestClient, engine: AsyncEngine) -> None:  # type: ignore[type-arg]
    await fill(client)
    progress: list[tuple[int, int, int]] = []
    result = await verify_chain(engine, batch=5, progress=lambda *p: progress.append(p))
    assert result.ok and result.first_bad is None
    assert result.checked == 13
    assert [p[0] for p in progress] == [5, 10, 13]  # bounded batches, each reported
    assert progress[-1] == (13, 13, 13)
    async with engine.connect() as conn:
        last = (await read_events(conn, after=12, limit=1))[0]
    assert result.last_good == Checkpoint(13, last.hash)


async def test_one_changed_byte_in_data_names_that_event(
    client: TestClient, engine: AsyncEngine
) -> None:  # type: ignore[type-arg]
    await fill(client)
    # The body '{"i": 5}' becomes '{"i": 6}' inside the stored data: one byte.
    await tamper(engine, "UPDATE events SET data = replace(data, ': 5}', ': 6}') WHERE seq = 7")
    async with engine.connect() as conn:
        [changed] = await read_events(conn, after=6, limit=1)
    assert changed.data["body"] == '{"i": 6}'
    result = await verify_chain(engine, batch=4)
    assert not result.ok
    assert result.first_bad is not None
    assert (result.first_bad.seq, result.first_bad.reason) == (7, HASH_MISMATCH)
    assert result.checked == 6


async def test_a_deleted_event_names_the_gap(client: TestClient, engine: AsyncEngine) -> None:  # type: ignore[type-arg]
    await fill(client)
    await tamper(engine, "DELETE FROM events WHERE seq = 9")
    result = await verify_chain(engine)
    assert result.first_bad is not None
    assert (result.first_bad.seq, result.first_bad.reason) == (9, GAP)
    assert "9 missing" in result.first_bad.message


async def test_a_checkpoint_skips_what_was_verified_and_must_still_match(
    client: TestClient,
    engine: AsyncEngine,  # type: ignore[type-arg]
) -> None:
    await fill(client)
    first = await verify_chain(engine)
    await fill_more(client)
    resumed = await verify_chain(engine, start=first.last_good)
    assert resumed.ok and resumed.checked == 4
    # An edit before the checkpoint is outside the range, but the checkpoint's hash exposes a
    # rewritten chain; an edit after it is caught as usual.
    await tamper(
        engine, "UPDATE events SET hash = replace(hash, substr(hash, 1, 1), 'x') WHERE seq = 13"
    )
    again = await verify_chain(engine, start=first.last_good)
    assert again.first_bad is not None
    assert (again.first_bad.seq, again.first_bad.reason) == (13, CHECKPOINT_MISMATCH)


async def test_a_checkpoints_own_event_rewritten_under_its_hash_is_found(
    client: TestClient,
    engine: AsyncEngine,  # type: ignore[type-arg]
) -> None:
    # The events after a checkpoint chain from its stored hash alone: its own content must be
    # checked, or an edit of it that left the hash as it was would verify from there.
    await fill(client)
    first = await verify_chain(engine)
    await fill_more(client)
    assert first.last_good.seq == 13
    await tamper(engine, "UPDATE events SET meta = replace(meta, '\"', '\" ') WHERE seq = 13")
    resumed = await verify_chain(engine, start=first.last_good)
    assert resumed.first_bad is not None
    assert (resumed.first_bad.seq, resumed.first_bad.reason) == (13, CHECKPOINT_MISMATCH)
    assert not resumed.ok and resumed.checked == 0
    # From the genesis, the same edit is the event's own hash mismatch.
    whole = await verify_chain(engine)
    assert whole.first_bad is not None
    assert (whole.first_bad.seq, whole.first_bad.reason) == (13, HASH_MISMATCH)


async def fill_more(client: TestClient) -> None:  # type: ignore[type-arg]
    for i in range(4):
        await deliver(client, "t", f'{{"more": {i}}}')


async def test_audit_api_reports_ok_then_the_first_bad_event(
    client: TestClient, engine: AsyncEngine
) -> None:  # type: ignore[type-arg]
    await fill(client)
    answer = await (await client.get("/api/audit/verify", headers=AUTH)).json()
    assert answer["ok"] is True and answer["checked"] == 13 and answer["first_bad"] is None
    checkpoint = answer["last_good"]
    await fill_more(client)
    query = f"/api/audit/verify?from_seq={checkpoint['seq']}&from_hash={checkpoint['hash']}"
    resumed = await (await client.get(query, headers=AUTH)).json()
    assert (resumed["ok"], resumed["checked"]) == (True, 4)
    await tamper(engine, "UPDATE events SET meta = '{}' WHERE seq = 15")
    broken = await (await client.get(query, headers=AUTH)).json()
    assert broken["ok"] is False
    assert broken["first_bad"]["seq"] == 15 and broken["first_bad"]["reason"] == HASH_MISMATCH
    bad = await client.get("/api/audit/verify?from_seq=3", headers=AUTH)
    assert bad.status == 400 and (await bad.json())["error"]["code"] == "invalid_query"


async def test_verify_command_exits_non_zero_and_names_the_event(
    client: TestClient,
    engine: AsyncEngine,
    settings: Settings,  # type: ignore[type-arg]
) -> None:
    await fill(client)
    good = await run_cli(settings.database_url, "verify")
    assert good.returncode == 0, good.stderr
    assert "ok: 13 events verified" in good.stdout
    assert "verify [" in good.stderr  # the progress bar
    await tamper(engine, "UPDATE events SET trigger_id = 'u' WHERE seq = 4")
    bad = await run_cli(settings.database_url, "verify", "--json")
    assert bad.returncode == 1
    assert orjson.loads(bad.stdout)["first_bad"]["seq"] == 4
