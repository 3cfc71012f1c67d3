"""schemathesis against a running `hookledger serve`, over every operation of /openapi.json, on
SQLite and on PostgreSQL: no 5xx, every answer as documented, every schema-violating request
refused.

Two runs on one server. The receiver first, alone, on a trigger that exists (so the decoding, the
keys and the appends are fuzzed, not the 404), then every other operation: schemathesis reuses
what answers hold (a trigger's id, an execution's), so the admin operations work on real
resources — the receiver's deliveries among them, read, replayed and rebuilt — and would rotate
the receiver's secret or delete its trigger if it ran after them.

Bounded for CI: 8 examples for each operation but the receiver, which gets 300 on SQLite and
1,000 on PostgreSQL (~15 s and ~25 s). Not checked:
`positive_data_acceptance` (the server also refuses on meaning — private addresses, a secret its
scheme cannot use — which a schema cannot say), and the stateful checks (no links between
operations). `GET /api/events/stream` is left out: it never ends, by design (tested in
tests/test_feed.py). HOOKLEDGER_FUZZ_EXAMPLES and HOOKLEDGER_FUZZ_SEED widen or vary a run.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import ADMIN_TOKEN
from processes import ServerProcess, register, start_server

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
EXAMPLES = int(os.environ.get("HOOKLEDGER_FUZZ_EXAMPLES", "8"))
# The receiver is one operation, the one open to anyone, and quick to fuzz (~1 s a hundred): it
# gets many more, and on PostgreSQL, which refuses more than SQLite takes, more again. At 300 the
# PostgreSQL leg missed a 1000 find (a text body with a NUL: the rebuild that read it failed).
RECEIVER_EXAMPLES = {"sqlite": max(EXAMPLES, 300), "postgres": max(EXAMPLES, 1000)}
SEED = os.environ.get("HOOKLEDGER_FUZZ_SEED", "20261129")
RECEIVER = "/webhooks/{trigger_id}"
# Deliveries go to a trigger that exists, so the receiver's decoding and keys are fuzzed too.
CONFIG = f"""
[[operations]]
include-path = "{RECEIVER}"
parameters = {{ "path.trigger_id" = "open" }}
"""
CHECKS = [
    "--checks",
    "all",
    "--exclude-checks",
    "positive_data_acceptance,use_after_free,ensure_resource_availability,"
    "object_level_authorization",
]


async def schemathesis(server: ServerProcess, workdir: Path, examples: int, *selection: str) -> str:
    """One schemathesis run over the operations `selection` picks; its report, asserted clean."""
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    process = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "--config-file",
        str(config),
        "--no-color",
        "run",
        server.url + "/openapi.json",
        *selection,
        *CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--header",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "--max-examples",
        str(examples),
        "--seed",
        SEED,
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 140)
    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-12000:]
    assert "Operations:" in report and "selected" in report
    return report


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_schemathesis_finds_nothing_over_every_operation(
    database_url: str, backend: str, tmp_path: Path
) -> None:
    server = await start_server(
        database_url, tmp_path, "--no-dispatch", env={"HOOKLEDGER_ADMIN_RATE_PER_S": "0"}
    )
    try:
        async with aiohttp.ClientSession() as session:
            await register(session, server, "open")
        receiver = ("--include-path", RECEIVER)
        await schemathesis(server, tmp_path, RECEIVER_EXAMPLES[backend], *receiver)
        await schemathesis(
            server,
            tmp_path,
            EXAMPLES,
            "--exclude-path",
            RECEIVER,
            "--exclude-path",
            "/api/events/stream",
        )
    finally:
        server.stop()
