"""uvicorn's httptools protocol with the limits it lacks: request-head size and time, Host.

uvicorn buffers request lines and headers of any size for as long as a client cares to send
them (robustness.md: slow clients, header floods). This subclass answers 431 once the head
passes `HEAD_LIMIT` bytes, 408 when it is not complete within `HEAD_TIMEOUT` seconds, and 400
to an HTTP/1.1 request without a Host header (RFC 9112 §3.2).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

# httptools itself refuses URLs over 64 KiB (IIS allows 65534 bytes); this bounds the rest.
HEAD_LIMIT = 192 * 1024
HEAD_TIMEOUT = 30.0
# After refusing, input is read and dropped for a while so that closing with unread data
# does not turn into a TCP reset that destroys our answer before the client reads it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024


class _MissingHost(Exception):
    """Stops the parser on a request we refuse; never leaves this module."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_bytes = 0
        self._head_done = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._lingering = -1  # bytes dropped after a refusal; -1 while not refusing
        self._refusal: bytes | None = None  # our own 400 body, when we refuse a request
        super().connection_made(transport)
        # A connection that never sends a byte is timed out too.
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES:
                self.transport.abort()
            return
        if not self._head_done:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)
            self._head_bytes += len(data)
            if self._head_bytes > HEAD_LIMIT:
                self._refuse(431, b"request head too large\n")
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head_done = True
        self._cancel_timer()
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
        self._head_done = False
        self._head_bytes = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def _cancel_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._head_done:
            self._refuse(408, b"request head not received in time\n")

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
        self._lingering = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
