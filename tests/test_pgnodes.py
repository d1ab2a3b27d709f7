"""Two `hsmscep serve` nodes on one PostgreSQL database: every guarantee holds cluster-wide.

Real parts: SoftHSM2 token, two uvicorn servers on 127.0.0.1 sharing it, a throwaway
PostgreSQL cluster reached over 127.0.0.1 with a password from a file.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography import x509

from hsmscep.policy.crl import CRL_PATH
from hsmscep.store.schema import serial_key
from hsmscep.testing import client
from tests.conftest import DevCa, Server, make_ca, start_server
from tests.pgcluster import PASSWORD, Cluster
from tests.test_enroll import (
    FAILURE,
    SUCCESS,
    TIMEOUT,
    fetch_ca_certs,
    issued_cert,
    new_request,
    open_reply,
    post_pki,
    rsa_key,
    subject,
)

pytestmark = pytest.mark.hsm

PENDING = "3"
TOKEN = "admin-token-pg-0123456789abcdef"
PROFILES = """
[admin]
token_file = "admin-token"

[profiles.otp]
challenge_mode = "one_time"

[profiles.manual]
challenge_file = "challenge"
approval = "manual"
"""


@pytest.fixture(scope="module")
def pg_ca(softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DevCa:
    directory = tmp_path_factory.mktemp("pgnodes")
    directory.mkdir(exist_ok=True)
    (directory / "admin-token").write_text(TOKEN + "\n")
    (directory / "db-password").write_text(PASSWORD + "\n")
    return make_ca(softhsm_dir, directory, "hsmscep-pgnodes", extra_config=PROFILES)


def node_env(cluster: Cluster, database: str, ca: DevCa) -> dict[str, str]:
    """The environment that points a node at the shared database (password from a file)."""
    return {
        "HSMSCEP_STORE_URL": cluster.tcp_url(database),
        "HSMSCEP_STORE_PASSWORD_FILE": str(ca.directory / "db-password"),
    }


@pytest.fixture(scope="module")
def two_nodes(pg_cluster: Cluster, pg_ca: DevCa) -> Iterator[tuple[Server, Server]]:
    pg_cluster.fresh_database("nodes")
    env = node_env(pg_cluster, "nodes", pg_ca)
    a = start_server(pg_ca, env)
    try:
        b = start_server(pg_ca, env)
    except BaseException:
        a.stop()
        raise
    yield a, b
    b.stop()
    a.stop()
    assert "Traceback" not in a.output() + b.output(), a.output() + b.output()


def query(cluster: Cluster, database: str, sql: str, *args: object) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(cluster.url(database))
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def admin(url: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=TIMEOUT, **kwargs)


def test_resent_pkcsreq_gets_the_same_certificate_from_either_node(
    two_nodes: tuple[Server, Server], pg_ca: DevCa, pg_cluster: Cluster
) -> None:
    a, b = two_nodes
    ca_certs = fetch_ca_certs(a.url)
    request = new_request(ca_certs, pg_ca.challenge, cn="resent", key_index=0)
    first = issued_cert(post_pki(a.url, request.der), request, ca_certs)
    again = issued_cert(post_pki(b.url, request.der), request, ca_certs)
    assert again.serial_number == first.serial_number
    rows = query(
        pg_cluster, "nodes", "SELECT serial FROM certificates WHERE transaction_id = $1",
        request.transaction_id,
    )  # fmt: skip
    assert [r[0] for r in rows] == [serial_key(first.serial_number)]


def test_one_time_challenge_50_requests_over_two_nodes_one_certificate(
    two_nodes: tuple[Server, Server], pg_ca: DevCa, pg_cluster: Cluster
) -> None:
    a, b = two_nodes
    issued = admin(b.url, "POST", "/admin/challenges", json={"profile": "otp"})
    assert issued.status_code == 201, issued.text
    challenge = issued.json()["challenge"]
    ca_certs = fetch_ca_certs(a.url)
    requests = [new_request(ca_certs, challenge, cn=f"otp-{i}", key_index=1) for i in range(50)]

    def send(i: int) -> tuple[str, str | None]:
        node = (a, b)[i % 2]
        result = open_reply(
            post_pki(f"{node.url}/scep/otp", requests[i].der), requests[i], ca_certs
        )
        return result.pki_status, result.fail_info

    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(send, range(50)))
    assert sum(status == SUCCESS for status, _ in outcomes) == 1, outcomes
    assert all(status in (SUCCESS, FAILURE) for status, _ in outcomes)
    tids = [r.transaction_id for r in requests]
    [(stored,)] = query(
        pg_cluster,
        "nodes",
        "SELECT COUNT(*) FROM certificates WHERE transaction_id = ANY($1)",
        tids,
    )
    assert stored == 1


def test_pending_approved_on_one_node_is_issued_by_the_others_poll(
    two_nodes: tuple[Server, Server], pg_ca: DevCa
) -> None:
    a, b = two_nodes
    ca_certs = fetch_ca_certs(a.url)
    key = rsa_key(2)
    name = subject("held-device")
    signer = client.self_signed_signer(key, name)
    request = client.build_pkcs_req(
        key=key, ca_certs=ca_certs, challenge=pg_ca.challenge, subject=name, signer_cert=signer
    )
    first = open_reply(post_pki(f"{a.url}/scep/manual", request.der), request, ca_certs)
    assert first.pki_status == PENDING
    listed = admin(b.url, "GET", "/admin/pending")
    assert listed.status_code == 200, listed.text
    [row] = [r for r in listed.json() if r["transaction_id"] == request.transaction_id]
    approved = admin(a.url, "POST", f"/admin/pending/{row['id']}/approve")
    assert approved.status_code == 200, approved.text
    poll = client.build_cert_poll(
        key=key,
        ca_certs=ca_certs,
        transaction_id=request.transaction_id,
        subject=name,
        signer_cert=signer,
    )
    result = open_reply(post_pki(f"{b.url}/scep/manual", poll.der), poll, ca_certs)
    assert (result.pki_status, result.fail_info) == (SUCCESS, None)
    [cert] = result.certificates
    cert.verify_directly_issued_by(ca_certs[0])
    assert cert.subject == name
    # The other node's poll answers the same certificate: it is in the shared store.
    again = open_reply(post_pki(f"{a.url}/scep/manual", poll.der), poll, ca_certs)
    assert [c.serial_number for c in again.certificates] == [cert.serial_number]


def test_revocation_on_one_node_is_in_the_crl_the_other_serves_signed_once(
    two_nodes: tuple[Server, Server], pg_ca: DevCa, pg_cluster: Cluster
) -> None:
    a, b = two_nodes
    ca_certs = fetch_ca_certs(a.url)
    request = new_request(ca_certs, pg_ca.challenge, cn="revoked", key_index=3)
    cert = issued_cert(post_pki(b.url, request.der), request, ca_certs)
    revoked = admin(
        a.url, "POST", f"/admin/certificates/{cert.serial_number:x}/revoke",
        json={"reason": "keyCompromise"},
    )  # fmt: skip
    assert revoked.status_code == 200, revoked.text
    # Both nodes serve CRLs at once, many times: each CRL number is signed by one node only.
    with ThreadPoolExecutor(16) as pool:
        crls = list(
            pool.map(
                lambda i: httpx.get(f"{(a, b)[i % 2].url}{CRL_PATH}", timeout=TIMEOUT), range(16)
            )
        )
    assert all(r.status_code == 200 for r in crls)
    parsed = [x509.load_der_x509_crl(r.content) for r in crls]
    for crl in parsed:
        assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        assert crl.is_signature_valid(ca_certs[0].public_key())  # type: ignore[arg-type]
    numbers = [r[0] for r in query(pg_cluster, "nodes", "SELECT number FROM crls ORDER BY number")]
    assert numbers == sorted(set(numbers))
    signed = re.findall(r"signing CRL (\d+)", a.output() + b.output())
    assert sorted(signed) == sorted(set(signed)), signed  # no number signed twice
    assert {str(n) for n in numbers} <= set(signed)


def test_cli_revoke_on_the_shared_store_reaches_every_node(
    two_nodes: tuple[Server, Server], pg_ca: DevCa, pg_cluster: Cluster
) -> None:
    a, b = two_nodes
    ca_certs = fetch_ca_certs(a.url)
    request = new_request(ca_certs, pg_ca.challenge, cn="cli-revoked", key_index=6)
    cert = issued_cert(post_pki(a.url, request.der), request, ca_certs)
    command = [sys.executable, "-m", "hsmscep", "revoke", "--config", str(pg_ca.config)]
    command += ["--serial", f"{cert.serial_number:x}", "--reason", "superseded"]
    env = dict(os.environ) | node_env(pg_cluster, "nodes", pg_ca)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    crl = x509.load_der_x509_crl(httpx.get(f"{b.url}{CRL_PATH}", timeout=TIMEOUT).content)
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
