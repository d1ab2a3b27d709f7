"""Slow and hostile HTTP clients against a live server started with a soft limit of 1,024 open
files (hard 2,048): the limit is raised, the request deadline covers the body, an early answer
closes the connection, and 2,500 slow connections do not stop enrollments (web/httpproto.py).
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hsmscep.testing import client
from tests.conftest import DevCa, free_port
from tests.test_orphans import serve
from tests.test_pipeline import build_requests, raw_post

pytestmark = pytest.mark.hsm

SLOW = 2_500
DEADLINE = 20  # seconds: HSMSCEP_HTTP_REQUEST_TIMEOUT of this server
SLOW_HEAD = (
    b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: t\r\n"
    b"Content-Type: application/x-pki-message\r\nContent-Length: 60000\r\n\r\n0"
)


def low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 2048))


@pytest.fixture(scope="module")
def port(dev_ca: DevCa, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    log = tmp_path_factory.mktemp("slow") / "server.log"
    env = {"HSMSCEP_SERVER_WORKERS": "1", "HSMSCEP_HTTP_REQUEST_TIMEOUT": str(DEADLINE)}
    process = serve(dev_ca, port, log, env, low_limit)
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=60)
        output = log.read_text(errors="replace")
        assert "Too many open files" not in output
    # The soft limit was raised to the hard one, and the cap derived from it was logged.
    assert "open files limit 2048 (soft limit was 1024): at most 1792 connections" in output


def read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything until the server closes, or `timeout` seconds pass (then what came)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def test_a_trickled_body_gets_408_within_the_request_deadline(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(SLOW_HEAD)
        reply = b""
        started = time.monotonic()
        # One byte a second keeps any idle timer happy; only the whole-request deadline ends it.
        while not reply and time.monotonic() - started < DEADLINE + 15:
            try:
                sock.sendall(b"0")
            except OSError:
                break
            sock.settimeout(1)
            try:
                reply = sock.recv(65536)
            except TimeoutError:
                continue
        reply += read_all(sock, 5)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert reply.endswith(b"request not received in time\n")


def test_an_early_answer_closes_the_connection(port: int) -> None:
    """413 for a declared body over the cap, sent before the body: the connection then ends
    (the client's trickle is not read on for ever)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(SLOW_HEAD.replace(b"60000", b"9000000") + b"0" * 70_000)
        reply = read_all(sock, DEADLINE / 2)  # closed well before the request deadline
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]


def test_enrollments_go_on_during_2500_slow_connections(dev_ca: DevCa, port: int) -> None:
    requests, ca_certs = build_requests(f"http://127.0.0.1:{port}", dev_ca, 6)
    slow: list[socket.socket] = []
    try:
        for _ in range(SLOW):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(SLOW_HEAD)
            slow.append(sock)
        with ThreadPoolExecutor(max_workers=3) as pool:
            answers = list(pool.map(lambda r: raw_post(port, r.der), requests))
        for (status, _, body), request in zip(answers, requests, strict=True):
            assert status == 200
            assert client.open_cert_rep(body, request, ca_certs).pki_status == "0"
        still_open = [sock for sock in slow if open_(sock)]
    finally:
        for sock in slow:
            sock.close()
    # The cap held (1,792 per process), shedding the slowest: the oldest ones went first.
    assert len(still_open) <= 1792
    assert slow[0] not in still_open and slow[-1] in still_open


def open_(sock: socket.socket) -> bool:
    """The server has neither closed nor reset this connection."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_the_limit_is_raised_in_process(tmp_path: Path) -> None:
    """raise_open_files_limit itself, in a child with a low soft limit."""
    import subprocess
    import sys

    code = (
        "import resource; from hsmscep.web.httpproto import raise_open_files_limit as r;"
        "print(r(), resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=low_limit, capture_output=True, check=True
    )
    assert out.stdout.decode().strip() == "(1024, 2048) (2048, 2048)"


def test_the_cap_holds_with_balanced_workers(dev_ca: DevCa, tmp_path: Path) -> None:
    """Two worker processes behind web/balance.py, a cap of 100 connections each: 300 slow
    connections leave at most 200 open, and enrollments go on."""
    port, cap = free_port(), 100
    env = {"HSMSCEP_SERVER_WORKERS": "2", "HSMSCEP_HTTP_MAX_CONNECTIONS": str(cap)}
    process = serve(dev_ca, port, tmp_path / "balanced.log", env)
    slow: list[socket.socket] = []
    try:
        requests, ca_certs = build_requests(f"http://127.0.0.1:{port}", dev_ca, 2)
        for _ in range(3 * cap):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(SLOW_HEAD)
            slow.append(sock)
        for request in requests:
            status, _, body = raw_post(port, request.der)
            assert status == 200
            assert client.open_cert_rep(body, request, ca_certs).pki_status == "0"
        assert sum(open_(sock) for sock in slow) <= 2 * cap
    finally:
        for sock in slow:
            sock.close()
        process.terminate()
        process.wait(timeout=60)
