"""The floor: the least a durable, deduplicating receiver must do on this stack.

The baseline (bench/baseline.py) with a write behind it, as the issue's bare prototype had: one
SQLite file (WAL, `synchronous=FULL`), one row per delivery keyed by (trigger, Idempotency-Key),
and one writer task that commits everything queued in one transaction before it answers (group
commit). A key seen before is answered 200 with the first delivery's id, as a duplicate. No log
beside the row, no hash chain, no projection, no validation, no headers kept.

It is not a product (it keeps no event log, no executions, nothing to replay): it shows how much
of the distance between the baseline and `hookledger serve` a durable write alone costs on this
machine, measured in the same run.

    python -m bench.floor --port 8901 --database /tmp/floor.db
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from aiohttp import web

from bench import baseline


@dataclass(slots=True)
class _Pending:
    trigger_id: str
    key: str
    body: str
    answer: asyncio.Future[tuple[int, bool]]  # (the delivery's seq, whether it is a duplicate)


class Writer:
    """One connection, one writer task: every queued delivery in one transaction."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS deliveries (seq INTEGER PRIMARY KEY, trigger_id TEXT"
            " NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL, UNIQUE (trigger_id, key))"
        )
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()

    def submit(self, trigger_id: str, key: str, body: str) -> asyncio.Future[tuple[int, bool]]:
        answer = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(trigger_id, key, body, answer))
        self._wake.set()
        return answer

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            try:
                answers = self._commit(batch)
            except sqlite3.Error as exc:
                for pending in batch:
                    pending.answer.set_exception(exc)
                continue
            for pending, answer in zip(batch, answers, strict=True):
                pending.answer.set_result(answer)

    def _commit(self, batch: list[_Pending]) -> list[tuple[int, bool]]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            keys = {(p.trigger_id, p.key) for p in batch}
            known = dict(self._known(keys))
            answers = []
            for pending in batch:
                found = known.get((pending.trigger_id, pending.key))
                if found is not None:
                    answers.append((found, True))
                    continue
                cursor = db.execute(
                    "INSERT INTO deliveries (trigger_id, key, body) VALUES (?, ?, ?)",
                    (pending.trigger_id, pending.key, pending.body),
                )
                seq = int(cursor.lastrowid or 0)
                known[(pending.trigger_id, pending.key)] = seq
                answers.append((seq, False))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return answers

    def _known(self, keys: set[tuple[str, str]]) -> list[tuple[tuple[str, str], int]]:
        found = []
        for trigger_id, key in keys:
            row = self._db.execute(
                "SELECT seq FROM deliveries WHERE trigger_id = ? AND key = ?", (trigger_id, key)
            ).fetchone()
            if row is not None:
                found.append(((trigger_id, key), int(row[0])))
        return found


_WRITER = web.AppKey("writer", Writer)


async def receive(request: web.Request) -> web.Response:
    raw = await request.read()
    parsed = orjson.loads(raw)
    key = request.headers.get("Idempotency-Key", "")
    writer = request.app[_WRITER]
    seq, duplicate = await writer.submit(request.match_info["trigger_id"], key, raw.decode())
    body = {"event_id": str(seq), "keys": len(parsed), "duplicate": duplicate}
    return web.Response(
        status=200 if duplicate else 202, body=orjson.dumps(body), content_type="application/json"
    )


def make_app(database: str) -> web.Application:
    app = web.Application()

    async def writing(app: web.Application) -> AsyncIterator[None]:
        app[_WRITER] = Writer(database)
        task = asyncio.create_task(app[_WRITER].run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(writing)
    app.router.add_post("/webhooks/{trigger_id}", receive)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8901)
    parser.add_argument("--database", default="floor.db")
    args = parser.parse_args()
    baseline.run(make_app(args.database), args.host, args.port)


if __name__ == "__main__":
    main()
