"""`hookledger serve --workers N`: ingest workers answer HTTP, the main process appends
(server/ingest.py). Real processes, a real database, real HTTP over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import AUTH
from processes import ServerProcess, register, start_server

from ledger.appender import Appender
from ledger.commands import AppendEvents, DeliveryOutcome, RecordDelivery
from ledger.errors import StorageUnavailable, StreamVersionConflict
from ledger.events import NewEvent, TriggerRegistered, WebhookReceived, trigger_stream
from ledger.migrate import upgrade
from ledger.store import create_engine, read_events
from server.config import Settings
from server.link import LedgerLink, serve_link
from server.metrics import Metrics
from server.remote import RemoteAppender, RemoteMetrics

JSON = {"Content-Type": "application/json"}


def _children(pid: int) -> list[int]:
    out = subprocess.run(  # noqa: S603, ASYNC221 - ps, briefly
        ["ps", "-o", "pid=", "--ppid", str(pid)],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by its parent) is gone for our purpose.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[1].split()[0] != "Z"


async def _until(condition: object, within_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


async def _serve(database_url: str, workdir: Path, workers: int) -> ServerProcess:
    """`serve --workers N`, once its main process has seen every worker listen (it says so in
    its output); /healthz may answer from a worker a moment before."""
    server = await start_server(database_url, workdir, "--workers", str(workers), "--no-dispatch")
    await _until(lambda: b"share the port" in server.log.read_bytes())
    return server


async def _deliver(
    session: aiohttp.ClientSession, server: ServerProcess, key: str
) -> tuple[int, str]:
    headers = JSON | {"Idempotency-Key": key}
    async with session.post(server.url + "/webhooks/t", data='{"a": 1}', headers=headers) as r:
        return r.status, (await r.json())["event_id"]


async def test_workers_record_every_delivery_once_and_report_one_registry(
    database_url: str, tmp_path: Path
) -> None:
    server = await _serve(database_url, tmp_path, 2)
    try:
        assert len(_children(server.process.pid)) == 2
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=32, force_close=True)
        ) as session:
            await register(session, server, "t")  # an admin command through a worker
            await asyncio.sleep(1.2)  # every worker's trigger cache (1 s) sees it
            # New connections each time (force_close): the kernel spreads them over the workers.
            answers = await asyncio.gather(
                *(_deliver(session, server, f"k{i % 40}") for i in range(120))
            )
            async with session.get(server.url + "/metrics", headers=AUTH) as r:
                page = await r.text()
            async with session.get(server.url + "/api/executions?limit=100", headers=AUTH) as r:
                executions = (await r.json())["executions"]
    finally:
        server.stop()
    assert sorted(status for status, _ in answers) == [200] * 80 + [202] * 40
    engine = create_engine(database_url)
    async with engine.connect() as conn:
        logged = await read_events(
            conn, limit=1000, types=["webhook.received", "webhook.duplicate"]
        )
    await engine.dispose()
    ids = {e.id: e.type for e in logged}
    assert len(logged) == 120
    for status, event_id in answers:  # each acknowledged delivery is in the log, as answered
        assert ids[event_id] == ("webhook.received" if status == 202 else "webhook.duplicate")
    # The counts of every worker land in the main process's registry, which any worker shows.
    assert (
        'hookledger_webhooks_received_total{outcome="accepted",reason="",trigger_id="t"} 40.0'
        in page
    )
    assert (
        'hookledger_webhooks_received_total{outcome="duplicate",reason="",trigger_id="t"} 80.0'
        in page
    )
    assert "hookledger_append_batch_size_count" in page
    # Projections were folded by the main process's appender, read by a worker.
    assert len(executions) == 40


async def test_a_worker_that_dies_is_restarted_and_the_main_one_stops_them_all(
    database_url: str, tmp_path: Path
) -> None:
    server = await _serve(database_url, tmp_path, 1)
    try:
        (first,) = _children(server.process.pid)
        os.kill(first, signal.SIGKILL)
        await _until(lambda: [p for p in _children(server.process.pid) if p != first])
        (second,) = [p for p in _children(server.process.pid) if p != first]
        async with aiohttp.ClientSession() as session:
            deadline = asyncio.get_running_loop().time() + 20
            while True:  # the new worker listens once it is up
                try:
                    await register(session, server, "t")
                    break
                except aiohttp.ClientError:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.1)
    finally:
        server.stop()  # SIGTERM: the main process stops its workers, then itself
    assert server.process.returncode == 0
    assert not _alive(second)


async def test_a_worker_stops_when_the_main_process_is_gone(
    database_url: str, tmp_path: Path
) -> None:
    server = await _serve(database_url, tmp_path, 1)
    try:
        (worker,) = _children(server.process.pid)
        async with aiohttp.ClientSession() as session:
            await register(session, server, "t")
            await asyncio.sleep(1.2)
            status, event_id = await _deliver(session, server, "before")
            assert status == 202
            server.process.kill()  # the main process, the one writer, dies at once
            server.process.wait(10)
            # Its worker cannot acknowledge anything any more: it stops, and the port closes.
            await _until(lambda: not _alive(worker))
            with pytest.raises(aiohttp.ClientConnectionError):
                await _deliver(session, server, "after")
    finally:
        server.stop()
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
    engine = create_engine(database_url)
    async with engine.connect() as conn:
        logged = await read_events(conn, limit=100, types=["webhook.received"])
    await engine.dispose()
    assert [e.id for e in logged] == [event_id]


async def test_the_link_carries_results_and_the_ledgers_errors(
    database_url: str, tmp_path: Path
) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    appender = Appender(engine)
    writing = asyncio.create_task(appender.run())
    path = tmp_path / "ledger.sock"

    async def page() -> bytes:
        return b"page"

    server = await serve_link(path, appender.enqueue_answered, Metrics(), page)
    appender.commit_listeners.append(server.committed)
    assert path.stat().st_mode & 0o777 == 0o600
    link = await LedgerLink.connect(path)
    remote = RemoteAppender(link)
    commits = asyncio.Event()  # a worker's live feeds listen here
    remote.commit_listeners.append(lambda *_: commits.set())
    try:
        event = NewEvent.of(trigger_stream("x"), "x", TriggerRegistered(id="x", source="generic"))
        (appended,) = await remote.append([event], expected_version=0)
        assert (appended.stream, appended.version) == (trigger_stream("x"), 1)
        async with asyncio.timeout(5):  # the main process's commit reached the worker
            await commits.wait()
        again = NewEvent.of(trigger_stream("x"), "x", TriggerRegistered(id="x", source="generic"))
        with pytest.raises(StreamVersionConflict):
            await remote.submit(AppendEvents(events=[again], expected_version=0))
        assert await link.call("metrics", None) == b"page"
        server.close()
        await server.wait_closed()
        link.close()
        await _until(link.lost.is_set, 5)
        # Once the link is lost, a command is refused as an outage: the sender gets a 503.
        with pytest.raises(StorageUnavailable):
            await remote.append([event], expected_version=1)
    finally:
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
        await appender.close()
        await engine.dispose()


Enqueue = Callable[[object, Callable[[object], None]], None]


@contextlib.asynccontextmanager
async def _link(path: Path, enqueue: Enqueue) -> AsyncIterator[LedgerLink]:
    """A worker's link to a main process whose appender is `enqueue` (as an appender's
    `enqueue_answered`: a command, and what to call with its result)."""

    async def page() -> bytes:
        return b""

    server = await serve_link(path, enqueue, Metrics(), page)
    link = await LedgerLink.connect(path)
    try:
        async with asyncio.timeout(5):
            yield link
    finally:
        link.close()
        server.close()
        await server.wait_closed()


async def test_an_answer_that_cannot_cross_the_link_is_an_error_not_a_hang(tmp_path: Path) -> None:

    def enqueue(_command: object, answer: Callable[[object], None]) -> None:
        answer(lambda: None)  # no pickle for a lambda

    async with _link(tmp_path / "l.sock", enqueue) as link:
        with pytest.raises(RuntimeError, match="PicklingError|AttributeError"):
            await link.call("append", None)


async def test_a_delivery_and_its_outcome_cross_the_link_whole(tmp_path: Path) -> None:
    # They cross as tuples of their fields (server/link.py `_DELIVERY`): every field, none
    # at its default, arrives as it was sent.
    outcome = DeliveryOutcome(
        event_id="e-2",
        execution_id="x-1",
        is_duplicate=True,
        original_event_id="e-1",
        seq=42,
        body_matches=False,
    )
    got: list[object] = []

    def enqueue(command: object, answer: Callable[[object], None]) -> None:
        got.append(command)
        answer(outcome)

    delivery = RecordDelivery.of(
        trigger_id="t",
        idempotency_key="k-1",
        meta={"request_id": "r", "source": "github"},
        received=WebhookReceived(
            execution_id="x-1",
            headers={"x-github-event": "push"},
            body="aGk=",
            content_type="application/octet-stream",
            body_sha256="ab" * 32,
            initial_status="filtered",
            body_encoding="base64",
        ),
    )
    async with _link(tmp_path / "l.sock", enqueue) as link:
        assert await RemoteAppender(link).submit(delivery) == outcome
    assert got == [delivery]


async def test_serve_stops_with_an_error_when_a_worker_cannot_listen(
    database_url: str, tmp_path: Path
) -> None:
    taken = socket.socket()  # a listener without SO_REUSEPORT: the workers cannot share it
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    environment = os.environ | {
        "HOOKLEDGER_DATABASE_URL": database_url,
        "HOOKLEDGER_ADMIN_TOKEN": "t",
        "HOOKLEDGER_SECRET_KEY": "k",
    }
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "serve", "--workers", "1", "--port", str(port),
            cwd=tmp_path, env=environment,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        async with asyncio.timeout(60):
            output, _ = await process.communicate()
    finally:
        taken.close()
    assert process.returncode == 1
    assert b"error: an ingest worker exited with code 1 before it listened" in output


async def test_a_live_feed_served_by_a_worker_wakes_on_the_main_process_commits(
    database_url: str, tmp_path: Path
) -> None:
    from test_feed import SseReader

    server = await _serve(database_url, tmp_path, 1)
    try:
        async with aiohttp.ClientSession() as session:
            await register(session, server, "t")
            await asyncio.sleep(1.2)
            url = server.url + "/api/events/stream?types=webhook.received"
            async with session.get(url, headers=AUTH) as response:
                feed = SseReader(response)
                waits = []
                for i in range(9):
                    status, _ = await _deliver(session, server, f"live-{i}")
                    answered = asyncio.get_running_loop().time()
                    await feed.take(1)
                    waits.append(asyncio.get_running_loop().time() - answered)
    finally:
        server.stop()
    # Woken by the commit, a feed sees an event within milliseconds; by its own poll alone,
    # anywhere within 0.5 s (a median under 0.1 s would then be a 2 % chance).
    assert sorted(waits)[4] < 0.1, waits


async def test_an_outage_crosses_the_link_as_an_outage_and_any_other_error_as_one(
    tmp_path: Path,
) -> None:
    """What the worker answers: 503 + Retry-After for StorageUnavailable, 500 for the rest."""
    import sqlalchemy as sa

    failures: list[BaseException] = [
        # A driver error's cause holds a connection and a traceback: it does not pickle as is.
        StorageUnavailable(sa.exc.OperationalError("SELECT 1", {}, ConnectionResetError("gone"))),
        sa.exc.IntegrityError("INSERT", {}, ValueError("not the idempotency index")),
    ]

    def enqueue(_command: object, answer: Callable[[object], None]) -> None:
        answer(failures.pop(0))

    async with _link(tmp_path / "l.sock", enqueue) as link:
        with pytest.raises(StorageUnavailable, match="OperationalError"):
            await link.call("append", None)
        with pytest.raises(RuntimeError, match="IntegrityError"):
            await link.call("append", None)


def test_serve_runs_one_worker_where_there_is_a_second_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HOOKLEDGER_WORKERS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert Settings.from_env().workers == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert Settings.from_env().workers == 0
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: as one
    assert Settings.from_env().workers == 0
    monkeypatch.setenv("HOOKLEDGER_WORKERS", "0")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert Settings.from_env().workers == 0


class _RecordingLink(LedgerLink):
    """A worker's link that notes the kind of every frame it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: list[object] = []

    def send(self, message: tuple[object, ...]) -> None:
        self.kinds.append(message[0])
        super().send(message)


async def test_a_workers_counts_reach_the_main_registry_once_an_iteration_before_a_scrape(
    tmp_path: Path,
) -> None:
    # A worker's counts of one loop iteration cross the link as one frame; a scrape sends those
    # not yet sent ahead of its call: it sees every answer counted before it, each once.
    main_metrics = Metrics()

    def enqueue(_command: object, _answer: Callable[[object], None]) -> None:
        raise AssertionError("no command crosses in this test")

    async def page() -> bytes:
        return main_metrics.render()

    path = tmp_path / "link.sock"
    server = await serve_link(path, enqueue, main_metrics, page)
    link = await _RecordingLink.connect(path)
    assert isinstance(link, _RecordingLink)
    metrics = RemoteMetrics(link)
    try:
        for _ in range(5):
            metrics.count_webhook("t", "accepted")
        metrics.count_webhook("t", "rejected", "bad_json")
        metrics.count_webhook("t", "rejected", "bad_json")
        async with asyncio.timeout(5):
            await asyncio.sleep(0)  # the iteration ends: its counts go, as one frame
            assert link.kinds == ["count"]
            metrics.count_webhook("t", "duplicate")
            text = (await metrics.page()).decode()
    finally:
        link.close()
        server.close()
    assert link.kinds == ["count", "count", "metrics"]
    counted = 'hookledger_webhooks_received_total{outcome="%s",reason="%s",trigger_id="t"} %s'
    assert counted % ("accepted", "", "5.0") in text
    assert counted % ("rejected", "bad_json", "2.0") in text
    assert counted % ("duplicate", "", "1.0") in text
