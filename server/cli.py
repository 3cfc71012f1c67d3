"""The `hookledger` command line.

Commands that change triggers or executions go through the same admin API a running server
offers, served in-process on a loopback port, so the CLI and HTTP share one code path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import getpass
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.engine import make_url

from ledger.appender import Appender
from ledger.errors import SecretKeyMismatch
from ledger.migrate import upgrade
from ledger.store import create_engine
from server import cli_readers, cli_rebuild, ingest, logs, monitoring
from server.app import build_services, make_app
from server.config import InvalidSetting, Settings
from server.link import READY, LedgerLink
from server.listener import bind, make_runner

logger = logging.getLogger(__name__)


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    return Settings.from_env(database_url=args.database_url, **extra)


async def _serve(args: argparse.Namespace) -> None:
    settings = _settings(
        args,
        host=args.host,
        port=args.port,
        dispatch=not args.no_dispatch,
        log_format=args.log_format,
    )
    logs.configure(settings.log_format)
    if args.ledger_link:
        await _serve_worker(settings, Path(args.ledger_link))
        return
    stop = _sigterm()
    token = settings.resolved_admin_token()
    services = build_services(settings)
    assert isinstance(services.appender, Appender)  # the main process: the one writer
    workers = args.workers if args.workers is not None else settings.workers
    app = make_app(settings, services)
    async with contextlib.AsyncExitStack() as stack:
        if workers == 0:
            runner: web.AppRunner = await _listen(app, settings)
        else:
            # The workers answer HTTP, all of it; this process is the ledger's: the one
            # appender (their appends come over the link), the projector and the dispatcher.
            runner = web.AppRunner(app, access_log=None)
            async with opening_database(settings):
                await runner.setup()
        stack.push_async_callback(runner.cleanup)
        if workers > 0:  # stopped before the runner's cleanup: their appends still commit
            pages = functools.partial(monitoring.metrics_page, services)
            try:
                await stack.enter_async_context(
                    ingest.running(workers, args.argv, services.appender, services.metrics, pages)
                )
            except ingest.WorkerFailed as exc:
                raise SystemExit(f"error: {exc}; its output is above") from None
        tune_gc()
        url = f"http://{settings.host}:{settings.port}/"
        if settings.claim_token_showing():
            # Shown once, as a notebook server does, by the first serve to listen after it was
            # generated (by any command); later starts point at the file instead.
            print(
                f"hookledger listening on {url}\n"
                f"  dashboard: {url}#token={token}\n"
                f"  admin token: {token}",
                flush=True,
            )
        else:
            print(
                f"hookledger listening on {url} (admin token in "
                f"{settings.token_path} or HOOKLEDGER_ADMIN_TOKEN)",
                flush=True,
            )
        if settings.private_destinations_allowed:
            print("  destinations on loopback and private networks are allowed", flush=True)
        if workers > 0:
            print(f"  {workers} ingest worker(s) share the port (server/ingest.py)", flush=True)
        await stop.wait()  # SIGTERM: the workers stop too


async def _serve_worker(settings: Settings, link_path: Path) -> None:
    """An ingest worker of `serve --workers N` (server/ingest.py): it stops with its link."""
    link = await LedgerLink.connect(link_path)
    services = build_services(settings, link=link)
    runner = await _listen(make_app(settings, services), settings, reuse_port=True)
    link.send((READY, 0, os.getpid()))  # the main process waits for every worker's
    tune_gc()
    try:
        await link.lost.wait()
    finally:
        await runner.cleanup()


async def _listen(
    app: web.Application, settings: Settings, *, reuse_port: bool = False
) -> web.AppRunner:
    runner = make_runner(app, settings)
    # Apart from the binding: a database refusing connections raises OSError too, and is not
    # the port's fault.
    async with opening_database(settings):
        await runner.setup()
    try:
        await bind(runner, host=settings.host, port=settings.port, reuse_port=reuse_port)
        return runner
    except OSError as exc:  # the port is taken, say: one line that says so, not a traceback
        await runner.cleanup()
        # errno's own words: the event loop's message repeats the address (a resolver's
        # error has a negative errno and its words in strerror).
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or exc
        raise SystemExit(
            f"error: cannot listen on {settings.host}:{settings.port}: {reason}"
        ) from None


@contextlib.asynccontextmanager
async def opening_database(settings: Settings) -> AsyncIterator[None]:
    """Around a command's first use of its database (the schema's upgrade): a database that
    cannot be reached or opened is said in one line, naming it (without its password)."""
    try:
        yield
    except (OSError, sa.exc.DBAPIError) as exc:
        url = make_url(settings.database_url).render_as_string(hide_password=True)
        cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
        raise SystemExit(f"error: cannot open the database {url}: {cause}") from None


@contextlib.asynccontextmanager
async def local_api(args: argparse.Namespace) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """The admin API of this database, served in-process on a loopback port for one command."""
    settings = _settings(args, dispatch=False, host="127.0.0.1")
    token = settings.resolved_admin_token()
    settings = replace(settings, admin_token=token)
    runner = web.AppRunner(make_app(settings), access_log=None)
    async with opening_database(settings):
        await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers=headers) as session:
            yield session, token
    finally:
        await runner.cleanup()


async def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    async with (
        local_api(args) as (session, _),
        session.request(method, path, json=body) as response,
    ):
        payload = await response.read()
        result = orjson.loads(payload) if payload else None
        if response.status >= 400:
            message = result["error"]["message"] if result else response.reason
            raise SystemExit(f"error: {message}")
        return result


async def _triggers(args: argparse.Namespace) -> None:
    if args.action == "add":
        body: dict[str, Any] = {"id": args.id, "source": args.source}
        if args.secret:
            body["secret"] = args.secret
        if args.generate_secret:
            body["generate_secret"] = True
        if args.destination:
            body["destination"] = {"url": args.destination}
        if args.key_path:
            body["idempotency_key_path"] = args.key_path
        _print_json(await _call(args, "POST", "/api/triggers", body))
    elif args.action == "list":
        _print_json(await _call(args, "GET", "/api/triggers"))
    elif args.action == "delete":
        await _call(args, "DELETE", f"/api/triggers/{args.id}")
        print(f"deleted {args.id}")
    else:
        _print_json(await _call(args, "POST", f"/api/triggers/{args.id}/{args.action}"))


async def _executions(args: argparse.Namespace) -> None:
    query = {
        k: v
        for k, v in (
            ("trigger_id", args.trigger),
            ("status", args.status),
            ("limit", str(args.limit)),
            ("cursor", args.cursor),
        )
        if v
    }
    path = "/api/executions?" + "&".join(f"{k}={v}" for k, v in query.items())
    if args.id:
        path = f"/api/executions/{args.id}"
    _print_json(await _call(args, "GET", path))


def _requester() -> str:
    try:
        name = getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        return "cli"
    # The API takes printable ASCII of at most 100 characters: a login name of other letters
    # (josé) is kept escaped, rather than every replay from this account refused.
    return f"cli:{ascii(name)[1:-1]}"[:100]


async def _replay(args: argparse.Namespace) -> None:
    if args.id:
        path = f"/api/executions/{args.id}/replay"
        _print_json(await _call(args, "POST", path, {"requested_by": _requester()}))
        return
    if not (args.dead_lettered and args.trigger):
        raise SystemExit("error: give an execution id, or --dead-lettered --trigger T")
    body: dict[str, Any] = {
        "trigger_id": args.trigger,
        "status": "dead_lettered",
        "requested_by": _requester(),
        "dry_run": args.dry_run,
    }
    body |= {k: v for k, v in (("since", args.since), ("until", args.until)) if v}
    if args.limit is not None:
        body["limit"] = args.limit
    _print_json(await _call(args, "POST", "/api/replays", body))


async def _dispatch(args: argparse.Namespace) -> None:
    """The dispatcher and the projector of this database, without an HTTP listener."""
    settings = _settings(args, dispatch=True, log_format=args.log_format)
    logs.configure(settings.log_format)
    stop = _sigterm()
    runner = web.AppRunner(make_app(settings), access_log=None)
    async with opening_database(settings):
        await runner.setup()  # the app's cleanup contexts: schema, appender, projector, dispatcher
    tune_gc()
    print(f"hookledger dispatching from {settings.database_url.split('://', 1)[0]}", flush=True)
    if settings.private_destinations_allowed:
        print("  destinations on loopback and private networks are allowed", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _sigterm() -> asyncio.Event:
    """Set on SIGTERM (what `docker stop` and systemd send), taken as SIGINT is: the command
    stops and its cleanup runs. Installed before the command says it is up, so that a SIGTERM
    right after that line is never the default's kill."""
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on this platform
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    return stop


async def _db_upgrade(args: argparse.Namespace) -> None:
    settings = _settings(args)
    engine = create_engine(settings.database_url)
    try:
        async with opening_database(settings):
            revision = await upgrade(engine)
        print(f"schema at revision {revision}")
    finally:
        await engine.dispose()


def _add_global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """Options every command takes, before or after its name (`hookledger serve
    --database-url …`). After it they default to SUPPRESS: a command's parser then sets only
    what was given after the name, which so wins over the same option given before it."""
    parser.add_argument(
        "--database-url",
        default=default,
        help="default: HOOKLEDGER_DATABASE_URL or ./hookledger.db",
    )


def _port(text: str) -> int:
    # The kernel takes a port modulo 65536: 70000 would listen on 4464 and announce 70000.
    port = int(text) if text.isdigit() else 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to 65535)")
    return port


def _workers(text: str) -> int:
    # Below 0, serve would listen neither itself nor through workers, yet say it listens.
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers (0 or more)")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hookledger", description=__doc__.splitlines()[0])
    _add_global_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the receiver, admin API, projector and dispatcher")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8080)
    serve.add_argument("--no-dispatch", action="store_true", help="do not forward deliveries here")
    serve.add_argument("--log-format", choices=["auto", "text", "json"], default=None)
    serve.add_argument(
        "--workers",
        type=_workers,
        default=None,
        help="ingest worker processes beside this one, sharing the port (default: "
        "HOOKLEDGER_WORKERS, else 1 with two or more cores, 0 with one)",
    )
    serve.add_argument("--ledger-link", help=argparse.SUPPRESS)  # set for a worker by its main
    db = sub.add_parser("db", help="schema")
    db.add_argument("action", choices=["upgrade"])
    triggers = sub.add_parser("triggers", help="add|list|pause|resume|delete")
    triggers.add_argument("action", choices=["add", "list", "pause", "resume", "delete"])
    triggers.add_argument("id", nargs="?")
    triggers.add_argument("--source", default="generic")
    triggers.add_argument("--secret")
    triggers.add_argument("--generate-secret", action="store_true")
    triggers.add_argument("--destination", help="URL to forward each delivery to")
    triggers.add_argument(
        "--key-path", help="idempotency_key_path: header:NAME or body:dotted.path"
    )
    events = sub.add_parser("events", help="print the log as JSON lines")
    events.add_argument("--after", type=int, default=0)
    events.add_argument("--follow", action="store_true")
    events.add_argument("--type", action="append", help="repeat or comma-separate")
    events.add_argument("--trigger")
    cli_readers.add_parsers(sub)
    executions = sub.add_parser("executions", help="list executions, or show one with its timeline")
    executions.add_argument("id", nargs="?")
    executions.add_argument("--trigger")
    executions.add_argument("--status")
    executions.add_argument("--limit", type=int, default=50)
    executions.add_argument("--cursor", help="the next_cursor of the page before: the next page")
    replay = sub.add_parser("replay", help="replay an execution, or a trigger's dead letters")
    replay.add_argument("id", nargs="?", help="the execution to replay")
    replay.add_argument("--dead-lettered", action="store_true", help="bulk: dead letters")
    replay.add_argument("--trigger", help="bulk: the trigger whose dead letters to replay")
    replay.add_argument("--since", help="bulk: received at or after (ISO-8601)")
    replay.add_argument("--until", help="bulk: received before (ISO-8601)")
    replay.add_argument("--limit", type=int, help="bulk: replay at most this many")
    replay.add_argument("--dry-run", action="store_true", help="bulk: only count")
    dispatch = sub.add_parser("dispatch", help="run only the dispatcher and projector (no HTTP)")
    dispatch.add_argument("--log-format", choices=["auto", "text", "json"], default=None)
    cli_rebuild.add_parser(sub)
    for command in sub.choices.values():
        _add_global_options(command, argparse.SUPPRESS)
    return parser


COMMANDS = {
    "serve": _serve,
    "db": _db_upgrade,
    "triggers": _triggers,
    "events": cli_readers.events_command,
    "executions": _executions,
    "rebuild": cli_rebuild.rebuild_command,
    "replay": _replay,
    "dispatch": _dispatch,
    **cli_readers.COMMANDS,
}


def tune_gc() -> None:
    """Once the server is up: what exists now (modules, schema, compiled statements) lives as
    long as the process, so the cyclic collector stops scanning it (`gc.freeze`), and collects
    the young generation every 20,000 allocations instead of 700. Measured at c=64: ~7 % less
    CPU per request and half the p99 (bench/README.md)."""
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a worker is started with them
    if args.command != "serve":
        logs.configure("text", logging.WARNING)
    if args.command == "triggers" and args.action != "list" and not args.id:
        raise SystemExit("error: give the trigger id")
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        try:
            runner(COMMANDS[args.command](args))
        except (SecretKeyMismatch, InvalidSetting) as exc:  # said in a line, not a traceback
            raise SystemExit(f"error: {exc}") from None
        except BrokenPipeError:
            # The reader of stdout left (`hookledger events | head`): stop quietly, as other
            # tools do. stdout points at /dev/null so that the flush at exit does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(1) from None
