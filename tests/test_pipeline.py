"""The signing pipeline under pressure: admission control and graceful shutdown, live server."""

from __future__ import annotations

import signal
import socket
import sqlite3
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmscep import client
from tests.conftest import DevCa, Server, start_server

pytestmark = pytest.mark.hsm


def build_requests(
    url: str, ca: DevCa, count: int
) -> tuple[list[client.ClientRequest], list[x509.Certificate]]:
    with urllib.request.urlopen(f"{url}/scep?operation=GetCACert") as r:
        ca_certs = client.parse_ca_certs(r.read())
    keys = [rsa.generate_private_key(65537, 2048) for _ in range(4)]
    requests = [
        client.build_pkcs_req(
            key=keys[i % len(keys)],
            ca_certs=ca_certs,
            challenge=ca.challenge,
            subject=x509.Name.from_rfc4514_string(f"CN=pipeline-{i}"),
        )
        for i in range(count)
    ]
    return requests, ca_certs


def raw_post(port: int, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """One POST on its own connection; (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


def rows(ca: DevCa) -> int:
    with sqlite3.connect(ca.settings.db_path) as db:
        return int(db.execute("SELECT count(*) FROM certificates").fetchone()[0])


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def test_overload_answers_503_with_retry_after_and_nothing_else(dev_ca: DevCa) -> None:
    srv = start_server(dev_ca, {"HSMSCEP_SERVER_POOL_SIZE": "1", "HSMSCEP_SERVER_MAX_PENDING": "2"})
    try:
        requests, ca_certs = build_requests(srv.url, dev_ca, 80)
        before = rows(dev_ca)
        with ThreadPoolExecutor(max_workers=80) as pool:
            answers = list(pool.map(lambda r: raw_post(port_of(srv), r.der), requests))
        after = rows(dev_ca)
    finally:
        srv.stop()
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    for (status, headers, body), request in zip(answers, requests, strict=True):
        if status == 503:
            assert headers.get("retry-after") == "1"
        else:
            result = client.open_cert_rep(body, request, ca_certs)
            assert result.pki_status == "0"
    assert after - before == statuses.count(200)


def test_graceful_shutdown_drains_in_flight_requests(dev_ca: DevCa) -> None:
    srv = start_server(dev_ca, {"HSMSCEP_SERVER_POOL_SIZE": "1"})
    requests, ca_certs = build_requests(srv.url, dev_ca, 40)
    before = rows(dev_ca)
    port = port_of(srv)

    def send(request: client.ClientRequest) -> tuple[int, bytes] | None:
        try:
            status, _, body = raw_post(port, request.der)
        except OSError:
            return None  # arrived after the listener closed
        return status, body

    with ThreadPoolExecutor(max_workers=40) as pool:
        futures = [pool.submit(send, r) for r in requests]
        futures[0].result()  # the server is busy with the rest now
        srv.process.send_signal(signal.SIGTERM)
        answers = [f.result() for f in futures]
    # uvicorn re-raises the signal once it has shut down cleanly
    assert srv.process.wait(timeout=60) in (0, -signal.SIGTERM)
    issued = 0
    for answer, request in zip(answers, requests, strict=True):
        if answer is None:
            continue
        status, body = answer
        assert status in (200, 503), status
        if status == 200:
            assert client.open_cert_rep(body, request, ca_certs).pki_status == "0"
            issued += 1
    assert issued >= 1
    assert rows(dev_ca) - before == issued  # nothing stored that was not delivered, and back
    assert "Application shutdown complete" in srv.output()
