"""The services one hookledger process runs, kept in the aiohttp app under a typed key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.appender import Appender
from ledger.vault import Vault
from projections.runner import ProjectionRunner
from server.catalog import TriggerCache
from server.config import Settings
from server.dispatcher import Dispatcher
from server.metrics import Metrics
from server.remote import RemoteAppender


@dataclass(slots=True)
class Services:
    settings: Settings
    engine: AsyncEngine
    appender: Appender | RemoteAppender  # RemoteAppender: an ingest worker (server/remote.py)
    runner: ProjectionRunner
    vault: Vault
    triggers: TriggerCache
    admin_token: str
    dispatcher: Dispatcher | None = None  # started when settings.dispatch
    metrics: Metrics = field(default_factory=Metrics)  # a registry per app


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
# The receiver's record of a request on aiohttp's route (server.receiver.Receipt), for the
# middleware to count its answer with.
RECEIPT: web.RequestKey[Any] = web.RequestKey("receipt", object)
