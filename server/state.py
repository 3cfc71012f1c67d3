"""The services one hookledger process runs, kept in the aiohttp app under a typed key."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.appender import Appender
from ledger.vault import Vault
from projections.runner import ProjectionRunner
from server.catalog import TriggerCache
from server.config import Settings


@dataclass(slots=True)
class Services:
    settings: Settings
    engine: AsyncEngine
    appender: Appender
    runner: ProjectionRunner
    vault: Vault
    triggers: TriggerCache
    admin_token: str


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
