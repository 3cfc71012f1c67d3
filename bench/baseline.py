"""The ceiling: a bare aiohttp app that does what the receiver must do at the least.

Read the body, parse it with orjson, answer JSON — on uvloop, as `hookledger serve` runs. It answers
202 with an `event_id`, in the receiver's shape, so the load generator's work per response is the
same for both and the ratio compares the servers alone.

    python -m bench.baseline --port 8900
"""

from __future__ import annotations

import argparse
import itertools

import orjson
import uvloop
from aiohttp import web

_ids = itertools.count(1)


async def receive(request: web.Request) -> web.Response:
    parsed = orjson.loads(await request.read())
    body = {"event_id": str(next(_ids)), "keys": len(parsed), "duplicate": False}
    return web.Response(status=202, body=orjson.dumps(body), content_type="application/json")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/webhooks/{trigger_id}", receive)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    args = parser.parse_args()
    run(make_app(), args.host, args.port)


def run(app: web.Application, host: str, port: int) -> None:
    """Serve `app` as every reference server of the bench runs: uvloop, no access log."""
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,
        print=None,
        backlog=1024,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
