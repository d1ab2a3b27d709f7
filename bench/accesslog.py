"""CPU per request of the request-id middleware and the access log (web/requestlog.py).

One process, no sockets: the middleware around a trivial ASGI app, driven directly on one
event loop, the log handler writing to /dev/null. Variants run interleaved, several rounds,
and the process CPU time per request is reported (robust on a loaded box):

    python -m bench.accesslog                 # 5 rounds of 20,000 requests per variant
    python -m bench.accesslog --rounds 9 --requests 50000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

from starlette.types import Message, Receive, Scope, Send

from hsmscep import logs
from hsmscep.web.requestlog import RequestLog

SCOPE: Scope = {
    "type": "http",
    "method": "POST",
    "path": "/scep",
    "query_string": b"operation=PKIOperation",
    "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/x-pki-message")],
    "client": ("127.0.0.1", 50000),
}


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    return None


async def _drive(app: object, requests: int) -> float:
    call = app  # an ASGI callable
    start = time.process_time()
    for _ in range(requests):
        await call(dict(SCOPE), _receive, _send)  # type: ignore[operator]
    return (time.process_time() - start) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    variants = {
        "no middleware": ("text", _app),
        "request id, access off": ("text", RequestLog(_app, access_log=False)),
        "request id + access, text": ("text", RequestLog(_app, access_log=True)),
        "request id + access, json": ("json", RequestLog(_app, access_log=True)),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    with open("/dev/null", "w") as sink:
        for _ in range(args.rounds):
            for name, (fmt, app) in variants.items():
                logs.configure("INFO", fmt)
                for handler in logging.getLogger().handlers:
                    if isinstance(handler, logging.StreamHandler):
                        handler.setStream(sink)
                results[name].append(asyncio.run(_drive(app, args.requests)))
    base = statistics.median(results["no middleware"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:28s} {median * 1e6:7.2f} µs/request  (+{(median - base) * 1e6:5.2f} µs)")


if __name__ == "__main__":
    main()
