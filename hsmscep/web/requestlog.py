"""Request ids and the access log: an ASGI middleware around every HTTP request.

Each request gets an id (the client's X-Request-ID when it is short and plain, else a fresh
one), echoed in the response and set in hsmscep.logs.current_request, so that every line
logged for the request (the audit line, errors, the signing worker's lines) carries it. After
the response, one access line on `hsmscep.access` (INFO): method, path (never the query: a
GET PKIOperation carries the whole pkiMessage there), status, duration, SCEP operation and
message type, client address.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hsmscep import logs

access = logging.getLogger("hsmscep.access")

HEADER = b"x-request-id"
# UUIDs, hex, base64 and the usual tracing ids; anything else is replaced, never echoed.
_SANE_ID = re.compile(rb"[A-Za-z0-9._:+=/-]{1,64}")
_OPERATION = re.compile(rb"(?:^|&)operation=([A-Za-z]{1,32})(?:&|$)")
_MAX_PATH = 200
_LINE = "%s %s %d %.1f ms %s %s"


def _new_ids() -> None:
    # Fresh ids: a random per-process prefix and a counter, cheaper than random bytes per
    # request; a forked child starts its own prefix.
    global _prefix, _counter
    _prefix, _counter = os.urandom(4).hex(), itertools.count()


_prefix, _counter = "", itertools.count()
_new_ids()
os.register_at_fork(after_in_child=_new_ids)


class RequestLog:
    """Tags each HTTP request with an id and writes its access line (if `access_log`)."""

    def __init__(self, app: ASGIApp, access_log: bool = True) -> None:
        self.app, self.access_log = app, access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = logs.RequestInfo(request_id(scope["headers"]))
        # Not reset afterwards: uvicorn runs each request in a task of its own, and its
        # "Exception in ASGI application" line, logged after the app returns, keeps the id.
        logs.current_request.set(info)
        echo = (HEADER, info.id.encode())
        status = 0
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), echo]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log and access.isEnabledFor(logging.INFO):
                _log_access(scope, info, status or 500, time.perf_counter() - start)


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID if it is 1-64 plain characters, else a fresh id (a random
    prefix per process and a counter: 16 or more hex digits)."""
    for name, value in headers:
        if name == HEADER:
            if _SANE_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return f"{_prefix}{next(_counter):08x}"


def _log_access(scope: Scope, info: logs.RequestInfo, status: int, seconds: float) -> None:
    path: str = scope["path"]
    if len(path) > _MAX_PATH or not path.isprintable():
        path = path[:_MAX_PATH].encode("unicode_escape").decode("ascii")
    found = _OPERATION.search(scope["query_string"])
    operation = found.group(1).decode("ascii") if found else None
    client = scope.get("client")
    kind = info.message_type
    data = {
        "method": scope["method"],
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "operation": operation,
        "message_type": kind,
        "client": client[0] if client else None,
    }
    # makeRecord + handle: the same filters and handlers as access.info(), without the
    # caller lookup (a stack walk) that a line of known origin does not need.
    args = (scope["method"], path, status, seconds * 1000, operation or "-", kind or "-")
    record = access.makeRecord(
        access.name, logging.INFO, __file__, 0, _LINE, args, None, extra={"data": data}
    )
    access.handle(record)
