"""The `hookledger` command line as a user runs it: real processes, real SQLite files."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from conftest import ADMIN_TOKEN, create_trigger
from processes import free_port, register, start_server
from traffic import DESTINATION, CliResult, append_outcome, deliver, run_cli

from ledger.events import ExecutionDeadLettered
from server.config import Settings
from server.state import SERVICES


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
        env={"HOOKLEDGER_SECRET_KEY": ""},  # the key file beside the database, as the CLI's
    )
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/healthz") as health:
                assert health.status == 200
            await register(session, server, "here")
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


def without_settings() -> dict[str, str]:
    """This environment without HOOKLEDGER_* settings: no admin token configured."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HOOKLEDGER_")}


async def serve_until_listening(workdir: Path, port: int) -> tuple[int | None, str]:
    """`hookledger serve` in `workdir` (./hookledger.db) until it has said where it listens, or
    until it exits; then stopped. Its exit status (None: it was listening) and what it printed."""
    process = subprocess.Popen(  # noqa: S603, ASYNC220 - our own console script; only forks
        [sys.executable, "-m", "server", "serve", "--port", str(port), "--workers", "0"],
        cwd=workdir,
        env=without_settings() | {"PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    lines: list[bytes] = []
    exited = None
    while not lines or b"destinations" not in lines[-1]:  # the last line it prints at start
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        if not line:
            exited = await asyncio.to_thread(process.wait, 30)
            break
        lines.append(line)
    process.terminate()
    process.wait(10)
    process.stdout.close()
    return exited, b"".join(lines).decode()


async def hookledger(workdir: Path, *args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        *args,
        cwd=workdir,
        env=without_settings() | {"PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(process.wait(), 60) == 0


async def test_the_first_serve_shows_a_token_another_command_generated(tmp_path: Path) -> None:
    await hookledger(tmp_path, "triggers", "add", "t")
    token = (tmp_path / "hookledger.token").read_text().strip()
    _, first = await serve_until_listening(tmp_path, free_port())
    _, second = await serve_until_listening(tmp_path, free_port())
    assert f"#token={token}" in first
    assert token not in second
    assert "hookledger.token" in second


async def test_a_serve_that_never_listened_leaves_the_showing_to_the_next(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        exited, failed = await serve_until_listening(tmp_path, taken.getsockname()[1])
    assert exited not in (None, 0), failed
    token = (tmp_path / "hookledger.token").read_text().strip()
    assert token not in failed
    _, first = await serve_until_listening(tmp_path, free_port())
    assert f"#token={token}" in first


async def test_of_serves_started_together_on_a_new_database_one_shows_the_token(
    tmp_path: Path,
) -> None:
    outputs = await asyncio.gather(
        *(serve_until_listening(tmp_path, free_port()) for _ in range(3))
    )
    token = (tmp_path / "hookledger.token").read_text().strip()
    assert all(exited is None for exited, _ in outputs), outputs
    assert sum(f"#token={token}" in output for _, output in outputs) == 1


async def test_rebuild_refuses_a_negative_seq_and_a_time_it_cannot_read(tmp_path: Path) -> None:
    database = tmp_path / "hookledger.db"
    for args, status, said in [
        (["--until-seq", "-5"], 2, "error: argument --until-seq: '-5' is not a seq"),
        (["--until-seq", "x"], 2, "error: argument --until-seq: 'x' is not a seq"),
        (["--as-of", "garbage"], 1, "error: --as-of 'garbage' is not an ISO-8601 time"),
        (["--as-of", "2026-13-45T00:00:00Z"], 1, "error: --as-of '2026-13-45T00:00:00Z'"),
        (["--until-seq", "3", "--as-of", "2026-01-01T00:00:00Z"], 2, "not allowed with"),
    ]:
        refused = await run_cli(sqlite_url(database), "rebuild", "trigger_executions", *args)
        assert refused.returncode == status, (args, refused.stdout)
        assert said in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        assert not database.exists()  # refused before the database was opened


async def test_readers_on_a_database_without_the_log_say_so_without_a_traceback(
    database_url: str,
) -> None:
    # No hookledger has set this database up: `events`, `verify` and `export` read it as it is
    # (a read-only role may run them), so they say what is missing instead of a traceback.
    for args, said in [
        (["events"], "error: no hookledger log in this database yet"),
        (["events", "--follow"], "error: no hookledger log in this database yet"),
        (["verify"], "error: no hookledger log in this database yet"),
        (["export", "events"], "error: no table 'events' in this database"),
    ]:
        refused = await run_cli(database_url, *args)
        assert refused.returncode == 1, (args, refused.stdout)
        assert said in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("workers", ["0", "1"])
async def test_serve_on_a_port_taken_says_so_in_a_line(
    database_url: str, tmp_path: Path, workers: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            "serve",
            "--port",
            str(port),
            "--workers",
            workers,  # 1: the worker binds, and its output is the main process's too
            cwd=tmp_path,
            env=os.environ
            | {
                "HOOKLEDGER_DATABASE_URL": database_url,
                "HOOKLEDGER_ADMIN_TOKEN": ADMIN_TOKEN,
                "HOOKLEDGER_SECRET_KEY": "test-secret-key",
                "HOOKLEDGER_LOG_FORMAT": "json",
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(60):
            out, _ = await process.communicate()
    said = out.decode()
    assert process.returncode == 1, said
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in said, said
    assert "Traceback" not in said


@pytest.mark.parametrize(
    "args",
    [
        # Said "cannot listen on 127.0.0.1:PORT: Connection refused": the port was free.
        ["serve", "--workers", "0"],
        ["serve", "--workers", "1"],  # a traceback
        ["triggers", "list"],  # a traceback
        ["db", "upgrade"],  # a traceback
    ],
)
async def test_a_database_that_refuses_connections_is_named_in_a_line(
    tmp_path: Path, args: list[str]
) -> None:
    nobody = f"postgresql://postgres:pw@127.0.0.1:{free_port()}/hookledger"  # nothing listens
    if args[0] == "serve":
        args = [*args, "--port", str(free_port())]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        *args,
        cwd=tmp_path,
        env=without_settings()
        | {"PYTHONPATH": os.pathsep.join(sys.path), "HOOKLEDGER_DATABASE_URL": nobody},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    said = out.decode()
    assert process.returncode == 1, said
    shown = nobody.replace(":pw@", ":***@").replace("postgresql:", "postgresql+asyncpg:")
    assert f"error: cannot open the database {shown}: " in said, said
    assert "cannot listen" not in said
    assert "Traceback" not in said


async def serve_refused(workdir: Path, *args: str, env: dict[str, str]) -> tuple[int, str]:
    """`hookledger serve …` in `workdir`, expected to refuse to start: its exit status and what
    it printed; a failure when it serves instead."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "serve",
        "--port",
        str(free_port()),
        "--workers",
        "0",
        *args,
        cwd=workdir,
        env=without_settings() | {"PYTHONPATH": os.pathsep.join(sys.path)} | env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(20):
            out, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"serve {args} with {env} started instead of refusing")
    assert process.returncode is not None
    return process.returncode, out.decode()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("HOOKLEDGER_MAX_BODY_BYTES", "1MB", "a whole number >= 1"),
        ("HOOKLEDGER_WORKERS", "-1", "a whole number >= 0"),  # would listen nowhere
        ("HOOKLEDGER_ADMIN_RATE_BURST", "0.5", "a number >= 1"),  # would refuse every /api/
        ("HOOKLEDGER_ADMIN_RATE_PER_S", "-1", "a number >= 0"),
        ("HOOKLEDGER_DISPATCH_CONCURRENCY", "0", "a whole number >= 1"),  # would never dispatch
        ("HOOKLEDGER_DISPATCH_POLL_S", "0", "a number > 0"),  # would poll in a busy loop
        ("HOOKLEDGER_BODY_TIMEOUT_S", "nan", "a number >= 0"),
        ("HOOKLEDGER_LEASE_S", "inf", "a number >= 0"),
        ("HOOKLEDGER_REPLAY_INTERVAL_S", "1m", "a number >= 0"),
        ("HOOKLEDGER_LOG_FORMAT", "JSON", "one of auto, text, json"),  # would write text
        ("HOOKLEDGER_ALLOW_PRIVATE_DESTINATIONS", "ture", "1/true/yes/on or 0/false/no/off"),
    ],
)
async def test_serve_refuses_a_setting_it_cannot_use_in_a_line(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    status, said = await serve_refused(tmp_path, env={variable: value})
    assert status == 1, said
    assert f"error: {variable}={value!r}: expected {expected}" in said, said
    assert "Traceback" not in said
    assert not (tmp_path / "hookledger.db").exists()  # refused before the database was opened


@pytest.mark.parametrize(
    "url", ["not a url", "mysql://me:hunter2@db/hooks", "postgresql+psycopg://me:hunter2@db/x"]
)
async def test_serve_refuses_a_database_url_of_another_backend_in_a_line(
    tmp_path: Path, url: str
) -> None:
    status, said = await serve_refused(tmp_path, env={"HOOKLEDGER_DATABASE_URL": url})
    assert status == 1, said
    assert "error: the database URL (HOOKLEDGER_DATABASE_URL or --database-url) is neither" in said
    assert "Traceback" not in said
    assert "hunter2" not in said


@pytest.mark.parametrize(
    ("args", "said"),
    [
        # The kernel takes a port modulo 65536: this one listened on 4464, announcing 70000.
        (["--port", "70000"], "argument --port: '70000' is not a port (1 to 65535)"),
        # Listened neither itself nor through workers, and said it listened.
        (["--workers", "-1"], "argument --workers: '-1' is not a number of workers"),
    ],
)
async def test_serve_refuses_a_port_or_workers_it_cannot_use(
    tmp_path: Path, args: list[str], said: str
) -> None:
    status, out = await serve_refused(tmp_path, *args, env={})
    assert status == 2, out
    assert said in out, out
    assert "Traceback" not in out


async def cli_beside(settings: Settings, workdir: Path, *args: str, **env: str) -> CliResult:
    """`hookledger …` on the database of the test's app, with its secret key."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        *args,
        cwd=workdir,
        env=os.environ
        | {
            "HOOKLEDGER_DATABASE_URL": settings.database_url,
            "HOOKLEDGER_SECRET_KEY": "test-secret-key",
        }
        | env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())


async def test_executions_pages_on_with_the_cursor_it_prints(
    client: TestClient,  # type: ignore[type-arg]
    settings: Settings,
    tmp_path: Path,
) -> None:
    await create_trigger(client, id="t")
    delivered = {(await deliver(client, "t", f'{{"i": {i}}}'))["execution_id"] for i in range(5)}
    seen: list[str] = []
    cursor: list[str] = []
    for _ in range(3):
        listed = await cli_beside(settings, tmp_path, "executions", "--limit", "2", *cursor)
        assert listed.returncode == 0, listed.stderr
        page = orjson.loads(listed.stdout)
        seen += [row["execution_id"] for row in page["executions"]]
        cursor = ["--cursor", page["next_cursor"]] if page["next_cursor"] else []
    assert cursor == []
    assert sorted(seen) == sorted(delivered) and len(seen) == 5  # none skipped, none repeated


async def test_replay_from_an_account_whose_name_is_not_ascii(
    client: TestClient,  # type: ignore[type-arg]
    settings: Settings,
    tmp_path: Path,
) -> None:
    await create_trigger(client, id="t", destination=DESTINATION)
    execution_id = (await deliver(client, "t"))["execution_id"]
    dead = [ExecutionDeadLettered(reason="permanent", error_category="permanent")]
    await append_outcome(client.app[SERVICES].appender, "t", execution_id, dead)
    name = {"USER": "jos\u00e9", "LOGNAME": "jos\u00e9"}  # getpass reads these first
    replayed = await cli_beside(settings, tmp_path, "replay", execution_id, **name)
    assert replayed.returncode == 0, replayed.stderr
    assert orjson.loads(replayed.stdout)["status"] == "pending"
    shown = await cli_beside(settings, tmp_path, "executions", execution_id)
    [request] = [e for e in orjson.loads(shown.stdout)["events"] if e["type"].endswith("requested")]
    assert request["data"]["requested_by"] == "cli:jos\\xe9"


async def test_dispatch_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    # What `docker stop` and systemd send: the dispatcher and projector stop as on Ctrl-C,
    # their connections closed, exit status 0, instead of the process killed where it stood.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "dispatch",
        cwd=tmp_path,
        env=without_settings() | {"PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), 30)
    assert first.startswith(b"hookledger dispatching"), first
    process.terminate()
    assert await asyncio.wait_for(process.wait(), 30) == 0
