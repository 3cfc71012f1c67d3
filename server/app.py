"""The aiohttp application: middlewares, routes, and the services' lifetimes (cleanup contexts)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from ledger.appender import Appender
from ledger.migrate import upgrade
from ledger.store import create_engine
from ledger.vault import Vault
from projections.registry import PROJECTIONS
from projections.runner import ProjectionRunner
from projections.trigger_executions import may_make_due
from server import admin, audit, feed, monitoring, openapi, replays, stats
from server.catalog import TriggerCache
from server.config import Settings
from server.dispatcher import Dispatcher
from server.errors import ApiError
from server.link import LedgerLink
from server.metrics import Metrics
from server.middleware import make_middleware
from server.ratelimit import ADMIN_LIMITER, INGEST_LIMITER, RateLimiter
from server.receiver import receive_webhook
from server.remote import RemoteAppender, RemoteMetrics
from server.secretkey import check_secret_key
from server.state import SERVICES, Services

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


class _DashboardFiles(web.StaticResource):
    """The dashboard's files, served by aiohttp. A name longer than the file system takes makes
    aiohttp's look-up raise ENAMETOOLONG, which it lets out: that is no such file, not an OSError
    for the error mapping to take for the database's (503 storage_unavailable, retry later)."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await super()._handle(request)
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            raise web.HTTPNotFound() from exc


async def _background(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    tasks = [asyncio.create_task(services.appender.run(), name="appender")]
    if services.settings.projector:
        tasks.append(asyncio.create_task(services.runner.run(), name="projector"))
    if services.settings.dispatch and services.dispatcher is not None:
        tasks.append(asyncio.create_task(services.dispatcher.run(), name="dispatcher"))
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await services.appender.close()


async def healthz(_request: web.Request) -> web.Response:
    return admin.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    is_ready, body = await monitoring.readiness(request.app[SERVICES])
    if not is_ready:
        raise ApiError(503, "not_ready", body["reason"])
    return admin.json_response(body)


async def dashboard(_request: web.Request) -> web.StreamResponse:
    index = STATIC / "index.html"
    if not index.exists():
        raise ApiError(404, "not_found", "the dashboard is not installed")
    return web.FileResponse(index)


def build_services(settings: Settings, link: LedgerLink | None = None) -> Services:
    """This process's services; with `link`, an ingest worker's: no appender, projector or
    dispatcher of its own, its appends and counts going to the main process (server/ingest.py)."""
    engine = create_engine(settings.database_url)
    vault = Vault(settings.resolved_secret_key())
    token = settings.resolved_admin_token()
    if link is not None:
        settings = replace(settings, projector=False, dispatch=False)
        remote = RemoteAppender(link, wait_s=settings.append_timeout_s)
        return Services(
            settings=settings,
            engine=engine,
            appender=remote,
            runner=ProjectionRunner(engine, list(PROJECTIONS.values()), wake=remote.committed),
            vault=vault,
            triggers=TriggerCache(engine, vault),
            admin_token=token,
            metrics=RemoteMetrics(link),
        )
    appender = Appender(engine, wait_s=settings.append_timeout_s)
    # Its `advanced` wakes the dispatcher: only after folding what may have made one due.
    runner = ProjectionRunner(
        engine, list(PROJECTIONS.values()), wake=appender.committed, wakes=may_make_due
    )
    if settings.projector:
        appender.folder = runner
    metrics = Metrics()  # one registry per app; the dispatcher calls metrics.observe_attempt
    dispatcher = Dispatcher(
        engine=engine,
        appender=appender,
        vault=vault,
        settings=settings,
        wake=runner.advanced,
        metrics=metrics,
    )
    return Services(
        settings=settings,
        engine=engine,
        appender=appender,
        runner=runner,
        vault=vault,
        triggers=TriggerCache(engine, vault),
        admin_token=token,
        dispatcher=dispatcher,
        metrics=metrics,
    )


async def _database(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    await upgrade(services.engine)
    await check_secret_key(services.engine, services.vault, services.settings.secret_key_source)
    yield
    await services.engine.dispose()


def make_app(settings: Settings, services: Services | None = None) -> web.Application:
    app = web.Application(
        middlewares=[make_middleware(settings.admin_rate_per_s, settings.admin_rate_burst)],
        client_max_size=settings.max_body_bytes,
    )
    app[SERVICES] = services or build_services(settings)
    app[INGEST_LIMITER] = RateLimiter()
    app[ADMIN_LIMITER] = RateLimiter()
    app.cleanup_ctx.extend([_database, _background])
    app.router.add_post("/webhooks/{trigger_id}", receive_webhook)
    app.router.add_routes(admin.routes)
    app.router.add_routes(replays.routes)
    app.router.add_routes(stats.routes)
    app.router.add_routes(audit.routes)
    feed.setup(app)
    monitoring.setup(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi.get_openapi)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", dashboard)
    if STATIC.exists():
        app.router.register_resource(_DashboardFiles("/static", STATIC))
    return app
