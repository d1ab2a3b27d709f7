"""uvicorn's httptools protocol with the limits it lacks: request size and time, Host, and a
cap on open connections.

uvicorn buffers request lines and headers of any size for as long as a client cares to send
them, awaits a body without limit, and keeps a connection open after answering 413 while the
client trickles on (robustness.md: slow clients). With the common limit of 1,024 open files,
about 2,100 slow connections stopped all service. This subclass answers 431 once the head
passes `HEAD_LIMIT` bytes, 408 when the whole request (head and body) is not in within
`REQUEST_TIMEOUT` seconds, 400 to an HTTP/1.1 request without a Host header (RFC 9112 §3.2),
closes the connection after any answer given before the request body was complete, and holds
at most `connection_cap()` connections per process: a new one sheds the longest idle
keep-alive connection first, else the one that has been sending its request the longest;
a connection whose request is being answered is never shed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import time

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

# httptools itself refuses URLs over 64 KiB (IIS allows 65534 bytes); this bounds the rest.
HEAD_LIMIT = 192 * 1024
# Head and body together; tuning (and the tests) may shorten it through the environment.
REQUEST_TIMEOUT = float(os.environ.get("HSMSCEP_HTTP_REQUEST_TIMEOUT", "30"))
# File descriptors left for everything but client connections: the HSM module, SQLite (three
# per WAL connection), logs, pipes; at least RESERVED_FDS, or an eighth of the limit.
RESERVED_FDS = 128
# After refusing, input is read and dropped for a while so that closing with unread data
# does not turn into a TCP reset that destroys our answer before the client reads it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024


log = logging.getLogger(__name__)


class _MissingHost(Exception):
    """Stops the parser on a request we refuse; never leaves this module."""


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft


@functools.cache
def connection_cap() -> int:
    """Open client connections one process holds at most, from its open files limit (or
    HSMSCEP_HTTP_MAX_CONNECTIONS, when lower)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
    cap = max(64, limit - max(RESERVED_FDS, limit // 8))
    configured = os.environ.get("HSMSCEP_HTTP_MAX_CONNECTIONS")
    return min(cap, int(configured)) if configured else cap


# This process's open connections, oldest first (a dict keeps insertion order).
_OPEN: dict[BoundedHttpToolsProtocol, None] = {}


def _shed_one() -> bool:
    """Close the connection that costs most and serves least; False if all are answering."""
    idle = slow = None
    for conn in _OPEN:
        if conn._idle_since is not None:
            if idle is None or conn._idle_since < idle._idle_since:  # type: ignore[operator]
                idle = conn
        elif conn._request_since is not None:
            if slow is None or conn._request_since < slow._request_since:  # type: ignore[operator]
                slow = conn
    victim = idle or slow
    if victim is None:
        return False
    victim._shed()
    return True


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_bytes = 0
        self._head_done = False
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = -1  # bytes dropped after a refusal; -1 while not refusing
        self._refusal: bytes | None = None  # our own 400 body, when we refuse a request
        self._request_since: float | None = None  # receiving a request since (monotonic)
        self._idle_since: float | None = None  # between requests since
        super().connection_made(transport)
        if len(_OPEN) >= connection_cap() and not _shed_one():
            transport.abort()  # every connection is being answered: this one waits its turn
            return
        _OPEN[self] = None
        # A connection that never sends a byte is timed out too.
        self._start_request()

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES:
                self.transport.abort()
            return
        if self._request_since is None:
            self._start_request()
        if not self._head_done:
            self._head_bytes += len(data)
            if self._head_bytes > HEAD_LIMIT:
                self._refuse(431, b"request head too large\n")
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head_done = True
        if self.parser.get_http_version() == "1.1" and not any(
            name == b"host" for name, _ in self.headers
        ):
            # Raising from a parser callback makes uvicorn answer 400 and close; the answer
            # itself is ours (send_400_response below).
            self._refusal = b"HTTP/1.1 request without a Host header\n"
            raise _MissingHost
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(400, refusal)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._cancel_timer()
        self._request_since = None  # being answered: never shed
        self._head_done = False
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        early = self.cycle is not None and self.cycle.more_body
        super().on_response_complete()
        if early and self._lingering < 0 and not self.transport.is_closing():
            # Answered (413, 400...) before the body was in: the rest is not worth reading.
            self._linger_close()
        elif self._request_since is None:
            self._idle_since = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        _OPEN.pop(self, None)
        self._cancel_timer()
        super().connection_lost(exc)

    def _start_request(self) -> None:
        self._request_since, self._idle_since = time.monotonic(), None
        self._cancel_timer()
        self._timer = self.loop.call_later(REQUEST_TIMEOUT, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        cycle = self.cycle if self._head_done else None
        if cycle is not None and cycle.response_started:
            self.transport.abort()
            return
        if cycle is not None:
            # The application waits for the rest of the body: tell it the client is gone, so
            # that nothing it sends reaches the connection after our answer.
            cycle.disconnected = True
            cycle.message_event.set()
        self._refuse(408, b"request not received in time\n")

    def _shed(self) -> None:
        log.debug("connection cap %d reached: shedding %s", connection_cap(), self.client)
        _OPEN.pop(self, None)
        self._cancel_timer()
        self.transport.abort()  # frees the descriptor now; a lingering close would keep it

    def _refuse(self, status: int, body: bytes) -> None:
        self._cancel_timer()
        if self.transport.is_closing():
            return
        self.transport.write(
            STATUS_LINE[status]
            + b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            + b"content-length: %d\r\n\r\n" % len(body)
            + body
        )
        self._linger_close()

    def _linger_close(self) -> None:
        self._cancel_timer()
        self._lingering = 0
        self._request_since, self._idle_since = None, time.monotonic()  # shed it first
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
