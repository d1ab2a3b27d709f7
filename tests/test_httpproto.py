"""web.httpproto on a real server: what uvicorn lets through that we refuse at the HTTP level."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from tests.conftest import Server


def _exchange(server: Server, raw: bytes) -> bytes:
    """Send `raw`, read until the server closes (bounded by the socket timeout)."""
    address = urlsplit(server.url)
    assert address.hostname is not None and address.port is not None
    with socket.create_connection((address.hostname, address.port), timeout=15) as conn:
        conn.sendall(raw)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_http11_without_host_is_refused_and_closed(server: Server) -> None:
    reply = _exchange(server, b"GET /scep?operation=GetCACaps HTTP/1.1\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in head.lower()
    assert body == b"HTTP/1.1 request without a Host header\n"


def test_http11_with_host_is_served(server: Server) -> None:
    reply = _exchange(
        server,
        b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"POSTPKIOperation" in reply


def test_http10_needs_no_host(server: Server) -> None:
    # HTTP/1.0 has no Host requirement; old embedded clients still send it.
    reply = _exchange(server, b"GET /scep?operation=GetCACaps HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"POSTPKIOperation" in reply


def test_the_refusal_does_not_reach_a_second_request(server: Server) -> None:
    # A pipelined second request after the refused one is never answered: the connection ends.
    reply = _exchange(
        server,
        b"GET /scep?operation=GetCACaps HTTP/1.1\r\n\r\n"
        b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"HTTP/1.1 200" not in reply and b"POSTPKIOperation" not in reply
