"""Faults on the shared PostgreSQL store, under load from real clients on real nodes:
the database restarted (503 with Retry-After while it is gone, then service resumes by
itself), and one node killed with SIGKILL (every certificate a client got is stored).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.store.schema import serial_key
from hsmscep.testing.replies import open_cert_rep
from tests.conftest import DevCa, Server, make_ca, start_server
from tests.pgcluster import PASSWORD, Cluster
from tests.test_enroll import PKI_MESSAGE, SUCCESS, fetch_ca_certs, new_request

pytestmark = pytest.mark.hsm

CLIENTS = 4
MAX_SECONDS = 120  # every load loop is bounded in time as well as in count


@dataclass
class Result:
    started: float
    ended: float
    status: int  # HTTP status; 0: no answer (connection refused or reset)
    retry_after: str | None
    cert: x509.Certificate | None


@pytest.fixture(scope="module")
def fault_ca(softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DevCa:
    directory = tmp_path_factory.mktemp("pgfaults")
    (directory / "db-password").write_text(PASSWORD + "\n")
    return make_ca(softhsm_dir, directory, "hsmscep-pgfaults")


def start_node(cluster: Cluster, ca: DevCa, database: str) -> Server:
    return start_server(
        ca,
        {
            "HSMSCEP_STORE_URL": cluster.tcp_url(database),
            "HSMSCEP_STORE_PASSWORD_FILE": str(ca.directory / "db-password"),
        },
    )


def stored(cluster: Cluster, database: str) -> dict[str, bytes]:
    async def run() -> dict[str, bytes]:
        conn = await asyncpg.connect(cluster.url(database))
        try:
            return {
                r[0]: bytes(r[1]) for r in await conn.fetch("SELECT serial, der FROM certificates")
            }
        finally:
            await conn.close()

    return asyncio.run(run())


def load(
    ca: DevCa, urls: Callable[[int], str], stop: threading.Event, results: list[Result]
) -> Callable[[], None]:
    """CLIENTS threads enrolling until `stop` (or MAX_SECONDS); returns what joins them."""
    ca_certs = fetch_ca_certs(urls(0))
    deadline = time.monotonic() + MAX_SECONDS
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=30) as http:
            n = 0
            while not stop.is_set() and time.monotonic() < deadline and n < 2000:
                n += 1
                request = new_request(ca_certs, ca.challenge, cn=f"load-{index}-{n}", key_index=5)
                started = time.monotonic()
                try:
                    response = http.post(
                        f"{urls(index)}/scep?operation=PKIOperation",
                        content=request.der,
                        headers={"Content-Type": PKI_MESSAGE},
                    )
                except httpx.TransportError:
                    outcome = Result(started, time.monotonic(), 0, None, None)
                    time.sleep(0.05)
                else:
                    cert = None
                    if response.status_code == 200:
                        reply = open_cert_rep(response.content, request, ca_certs)
                        if reply.pki_status == SUCCESS:
                            [cert] = reply.certificates
                    outcome = Result(
                        started,
                        time.monotonic(),
                        response.status_code,
                        response.headers.get("retry-after"),
                        cert,
                    )
                with lock:
                    results.append(outcome)

    pool = ThreadPoolExecutor(CLIENTS)
    futures = [pool.submit(client, i) for i in range(CLIENTS)]

    def join() -> None:
        stop.set()
        for future in futures:
            future.result()
        pool.shutdown()

    return join


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def successes(results: list[Result], after: float = 0.0) -> list[Result]:
    return [r for r in list(results) if r.cert is not None and r.started > after]


def assert_received_are_stored(results: list[Result], rows: dict[str, bytes]) -> None:
    received = [r.cert for r in results if r.cert is not None]
    serials = [c.serial_number for c in received]
    assert len(serials) == len(set(serials)), "a serial was issued twice"
    for cert in received:
        assert rows.get(serial_key(cert.serial_number)) == cert.public_bytes(Encoding.DER)


def test_database_restart_mid_load(pg_cluster: Cluster, fault_ca: DevCa) -> None:
    pg_cluster.fresh_database("restart")
    server = start_node(pg_cluster, fault_ca, "restart")
    results: list[Result] = []
    join = load(fault_ca, lambda i: server.url, threading.Event(), results)
    try:
        wait_for(lambda: len(successes(results)) >= 5, "enrollments before the restart")
        pg_cluster.stop("fast")
        down_at = time.monotonic()
        try:
            wait_for(
                lambda: sum(r.started > down_at for r in list(results)) >= 8,
                "requests while the database is down",
            )
        finally:
            up_at = time.monotonic()
            pg_cluster.start()
        wait_for(lambda: len(successes(results, up_at)) >= 5, "enrollments after the restart")
    finally:
        join()
        server.stop()
    while_down = [r for r in results if r.started > down_at and r.ended < up_at]
    assert while_down, "no request was answered while the database was down"
    assert all(r.status == 503 and r.retry_after for r in while_down), [
        (r.status, r.retry_after) for r in while_down
    ]
    assert_received_are_stored(results, stored(pg_cluster, "restart"))
    assert "Traceback" not in server.output()


def test_node_killed_mid_load_loses_no_issued_certificate(
    pg_cluster: Cluster, fault_ca: DevCa
) -> None:
    pg_cluster.fresh_database("kill")
    a = start_node(pg_cluster, fault_ca, "kill")
    b = start_node(pg_cluster, fault_ca, "kill")
    results: list[Result] = []
    join = load(fault_ca, lambda i: (a, b)[i % 2].url, threading.Event(), results)
    try:
        wait_for(lambda: len(successes(results)) >= 10, "enrollments on both nodes")
        os.kill(a.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: len(successes(results, killed_at)) >= 5, "enrollments on the survivor")
        # The killed node's workers finish what they hold (up to orphans.GRACE) before they go:
        # wait for a client to see it rather than stop the load first.
        wait_for(
            lambda: any(r.status == 0 and r.started > killed_at for r in list(results)),
            "a client to see the killed node go",
        )
    finally:
        join()
        a.stop()
        b.stop()
    assert a.process.returncode == -signal.SIGKILL
    assert any(r.status == 0 for r in results), "no client saw the killed node go"
    assert_received_are_stored(results, stored(pg_cluster, "kill"))
