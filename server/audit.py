"""`GET /api/audit/verify`: recompute the hash chain from the genesis or from a checkpoint."""

from __future__ import annotations

import re
from collections.abc import Mapping

from aiohttp import web

from ledger.chain import GENESIS, Checkpoint, verify_chain
from server.admin import json_response
from server.errors import ApiError
from server.queries import int_param
from server.state import SERVICES

routes = web.RouteTableDef()

_HASH = re.compile(r"^[0-9a-f]{64}$")


def checkpoint_of(from_seq: int | None, from_hash: str | None) -> Checkpoint:
    """The start an auditor gave: both seq and hash, or neither (the genesis)."""
    if from_seq is None and not from_hash:
        return GENESIS
    if from_seq is None or not from_hash:
        raise ValueError("give both from_seq and from_hash, or neither")
    if not _HASH.match(from_hash):
        raise ValueError("from_hash must be 64 lowercase hex digits")
    return Checkpoint(from_seq, from_hash)


def _checkpoint(query: Mapping[str, str]) -> Checkpoint:
    seq = int_param(query, "from_seq", -1)
    try:
        return checkpoint_of(None if seq < 0 else seq, query.get("from_hash") or None)
    except ValueError as exc:
        raise ApiError(400, "invalid_query", str(exc)) from None


@routes.get("/api/audit/verify")
async def verify(request: web.Request) -> web.Response:
    start = _checkpoint(request.query)
    result = await verify_chain(request.app[SERVICES].engine, start=start)
    return json_response(result.to_json())
