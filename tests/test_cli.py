"""The `hookledger` command line as a user runs it: real processes, real SQLite files."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson
from conftest import AUTH
from processes import start_server
from traffic import run_cli


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def test_serve_takes_the_database_url_after_the_command_and_it_wins(
    tmp_path: Path,
) -> None:
    before, after = tmp_path / "before.db", tmp_path / "after.db"
    server = await start_server(
        sqlite_url(tmp_path / "env.db"),
        tmp_path,
        "--database-url",
        sqlite_url(after),
        "--workers",
        "1",  # a worker is started with the same arguments: it must take them too
        "--no-dispatch",
        before=["--database-url", sqlite_url(before)],
    )
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/healthz") as health:
                assert health.status == 200
            body = {"id": "here"}
            async with session.post(server.url + "/api/triggers", json=body, headers=AUTH) as r:
                assert r.status == 201, await r.text()
    finally:
        server.stop()
    assert after.exists()
    assert not before.exists()
    assert not (tmp_path / "env.db").exists()
    listed = await run_cli(sqlite_url(after), "triggers", "list")
    assert listed.returncode == 0, listed.stderr
    assert [t["id"] for t in orjson.loads(listed.stdout)["triggers"]] == ["here"]


async def test_other_commands_take_the_database_url_after_their_name_too(
    tmp_path: Path,
) -> None:
    before, after = tmp_path / "before.db", tmp_path / "after.db"
    added = await run_cli(
        sqlite_url(before), "triggers", "add", "t", "--database-url", sqlite_url(after)
    )
    assert added.returncode == 0, added.stderr
    assert after.exists()
    assert not before.exists()
    stats = await run_cli(
        sqlite_url(before), "stats", "--json", "--database-url", sqlite_url(after)
    )
    assert stats.returncode == 0, stats.stderr
    upgraded = await run_cli(
        sqlite_url(before), "db", "upgrade", "--database-url", sqlite_url(after)
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert not before.exists()
    listed = await run_cli(sqlite_url(after), "triggers", "list")
    assert [t["id"] for t in orjson.loads(listed.stdout)["triggers"]] == ["t"]
