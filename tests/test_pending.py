"""Manual approval end to end: PENDING, CertPoll, approve/reject by the CLI and the admin API.

Real `hsmscep serve` processes on a SoftHSM2 token and SQLite; decisions are made by
`hsmscep pending` in its own process or over the admin HTTP API, and servers are restarted
between request, decision and poll to show that pending requests live in the store.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmscep.config.settings import load_settings
from hsmscep.errors import ConfigError, RequestConflict, UnknownRequest
from hsmscep.store.records import PendingRequest
from hsmscep.store.sqlite import _MIGRATIONS, SCHEMA_VERSION, CertStore
from hsmscep.testing import client
from tests.conftest import DevCa, Server, make_ca, start_server
from tests.conftest import post_pki_message as post

pytestmark = pytest.mark.hsm

SUCCESS, FAILURE, PENDING = "0", "2", "3"
BAD_REQUEST = "2"
TIMEOUT = 30.0
TOKEN = "admin-token-0123456789abcdef"
TTL_HOURS = 2
SCEPCLIENT = shutil.which("scepclient")


# ---- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pca(softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DevCa:
    """A CA whose requests wait for approval (TTL 2 h), with an admin token in a file."""
    directory = tmp_path_factory.mktemp("pending")
    (directory / "admin-token").write_text(TOKEN + "\n")
    extra = '\n[admin]\ntoken_file = "admin-token"\n'
    ca = make_ca(softhsm_dir, directory, "pending-ca", extra_config=extra)
    text = ca.config.read_text()
    manual = f'validity_days = 365\napproval = "manual"\npending_ttl_hours = {TTL_HOURS}\n'
    ca.config.write_text(text.replace("validity_days = 365\n", manual, 1))
    settings = load_settings(ca.config)
    assert settings.enroll.approval == "manual" and settings.admin.token == TOKEN
    return ca


@pytest.fixture(scope="module")
def pserver(pca: DevCa) -> Iterator[Server]:
    srv = start_server(pca)
    yield srv
    stop_checked(srv)


def stop_checked(srv: Server) -> None:
    srv.stop()
    output = srv.output()
    assert "Traceback" not in output
    assert TOKEN not in output  # neither the admin token nor the challenge is ever logged
    assert "secret-pending-ca" not in output


def get_ca_certs(url: str) -> list[x509.Certificate]:
    response = httpx.get(f"{url}/scep", params={"operation": "GetCACert"}, timeout=TIMEOUT)
    return client.parse_ca_certs(response.content)


class Requester:
    """One client: a key, its self-signed signer certificate and one transactionID."""

    def __init__(self, ca: DevCa, ca_certs: Sequence[x509.Certificate], cn: str) -> None:
        self.ca, self.ca_certs = ca, list(ca_certs)
        self.key = rsa.generate_private_key(65537, 2048)
        self.subject = x509.Name.from_rfc4514_string(f"CN={cn},O=Pending Test")
        self.signer = client.self_signed_signer(self.key, self.subject)
        self.sans = [x509.DNSName(f"{cn}.example.test")]
        self.transaction_id = f"tx-{cn}"

    def pkcs_req(self, url: str, challenge: str | None = None) -> client.CertRepResult:
        request = client.build_pkcs_req(
            key=self.key,
            ca_certs=self.ca_certs,
            challenge=challenge if challenge is not None else self.ca.challenge,
            subject=self.subject,
            sans=self.sans,
            signer_cert=self.signer,
            transaction_id=self.transaction_id,
        )
        return client.open_cert_rep(post(url, request.der), request, self.ca_certs)

    def poll(self, url: str, cipher: str = "aes256") -> client.CertRepResult:
        request = client.build_cert_poll(
            key=self.key,
            ca_certs=self.ca_certs,
            transaction_id=self.transaction_id,
            subject=self.subject,
            signer_cert=self.signer,
            cipher=cipher,
        )
        result = client.open_cert_rep(post(url, request.der), request, self.ca_certs)
        assert result.signer_cert == self.ca_certs[1]  # signed by the RA, like every CertRep
        return result

    def check_certificate(self, result: client.CertRepResult) -> x509.Certificate:
        assert (result.pki_status, result.fail_info) == (SUCCESS, None)
        [cert] = result.certificates
        cert.verify_directly_issued_by(self.ca_certs[0])
        assert cert.subject == self.subject
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert list(sans) == self.sans
        assert spki(cert.public_key()) == spki(self.key.public_key())
        return cert


def spki(key: Any) -> bytes:
    return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def pending_cli(ca: DevCa, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmscep", "pending", *args, "--config", str(ca.config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_list(ca: DevCa) -> list[dict[str, Any]]:
    listed = pending_cli(ca, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows: list[dict[str, Any]] = json.loads(listed.stdout)
    return rows


def row_for(rows: list[dict[str, Any]], transaction_id: str) -> dict[str, Any]:
    [row] = [r for r in rows if r["transaction_id"] == transaction_id]
    return row


def admin(
    url: str, method: str, path: str, token: str | None = TOKEN, scheme: str = "Bearer"
) -> httpx.Response:
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=TIMEOUT)


def stored(ca: DevCa, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
    with closing(sqlite3.connect(ca.settings.store.path)) as db:
        return list(db.execute(sql, params))


def certificates_for(ca: DevCa, transaction_id: str) -> list[int]:
    rows = stored(ca, "SELECT serial FROM certificates WHERE transaction_id = ?", (transaction_id,))
    return [int(serial, 16) for (serial,) in rows]


# ---- approve by the CLI, reject by the admin API, across restarts --------------------------


def test_pending_then_approved_by_cli_across_restart(pca: DevCa) -> None:
    srv = start_server(pca)
    try:
        ca_certs = get_ca_certs(srv.url)
        alice = Requester(pca, ca_certs, "alice")
        first = alice.pkcs_req(srv.url)
        assert (first.pki_status, first.fail_info, first.certificates) == (PENDING, None, [])
        assert alice.poll(srv.url).pki_status == PENDING
        # A re-sent PKCSReq with the same transactionID is the same request, still pending.
        assert alice.pkcs_req(srv.url).pki_status == PENDING
    finally:
        stop_checked(srv)
    rows = [r for r in cli_list(pca) if r["transaction_id"] == alice.transaction_id]
    assert len(rows) == 1
    [row] = rows
    assert row["subject"] == "CN=alice,O=Pending Test"
    assert row["sans"] == ["DNS:alice.example.test"]
    assert row["key"] == "RSA 2048"
    assert row["requester_ip"] == "127.0.0.1"
    assert 0 <= row["age_seconds"] < 3600 and row["expired"] is False
    assert certificates_for(pca, alice.transaction_id) == []

    approved = pending_cli(pca, "approve", str(row["id"]))
    assert approved.returncode == 0, approved.stderr
    assert f"approved request {row['id']}" in approved.stdout
    again = pending_cli(pca, "approve", str(row["id"]))
    assert again.returncode == 0 and "already approved" in again.stdout
    assert alice.transaction_id not in [r["transaction_id"] for r in cli_list(pca)]
    assert certificates_for(pca, alice.transaction_id) == []  # issued at the next poll

    srv = start_server(pca)
    try:
        cert = alice.check_certificate(alice.poll(srv.url))
        assert certificates_for(pca, alice.transaction_id) == [cert.serial_number]
        # Later polls and a re-sent PKCSReq get the same certificate, never a second one.
        assert alice.check_certificate(alice.poll(srv.url, cipher="des3")) == cert
        assert alice.check_certificate(alice.pkcs_req(srv.url)) == cert
        assert certificates_for(pca, alice.transaction_id) == [cert.serial_number]
    finally:
        stop_checked(srv)
    [(status,)] = stored(
        pca, "SELECT status FROM pending_requests WHERE transaction_id = ?", (alice.transaction_id,)
    )
    assert status == "issued"
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pca.settings.ca.cert), "/dev/stdin"],
        input=cert.public_bytes(Encoding.PEM),
        capture_output=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_pending_then_rejected_by_admin_api_across_restart(pca: DevCa) -> None:
    srv = start_server(pca)
    try:
        ca_certs = get_ca_certs(srv.url)
        bob = Requester(pca, ca_certs, "bob")
        assert bob.pkcs_req(srv.url).pki_status == PENDING
    finally:
        stop_checked(srv)
    srv = start_server(pca)
    try:
        listed = admin(srv.url, "GET", "/admin/pending")
        assert listed.status_code == 200
        assert listed.headers["content-type"] == "application/json"
        row = row_for(listed.json(), bob.transaction_id)
        assert row["subject"] == "CN=bob,O=Pending Test"
        assert row["sans"] == ["DNS:bob.example.test"]
        assert row["key"] == "RSA 2048"
        assert row["requester_ip"] == "127.0.0.1"
        assert isinstance(row["age_seconds"], int) and row["age_seconds"] >= 0
        assert bob.poll(srv.url).pki_status == PENDING

        rejected = admin(srv.url, "POST", f"/admin/pending/{row['id']}/reject")
        assert rejected.status_code == 200, rejected.text
        assert rejected.json()["status"] == "rejected" and rejected.json()["changed"] is True
        # The decision stands: approving a rejected request is a conflict.
        conflict = admin(srv.url, "POST", f"/admin/pending/{row['id']}/approve")
        assert conflict.status_code == 409
        missing = admin(srv.url, "POST", "/admin/pending/999999/approve")
        assert missing.status_code == 404
        assert admin(srv.url, "POST", "/admin/pending/x1/approve").status_code == 404
    finally:
        stop_checked(srv)
    srv = start_server(pca)
    try:
        polled = bob.poll(srv.url)
        assert (polled.pki_status, polled.fail_info) == (FAILURE, BAD_REQUEST)
        resent = bob.pkcs_req(srv.url)
        assert (resent.pki_status, resent.fail_info) == (FAILURE, BAD_REQUEST)
        listed = admin(srv.url, "GET", "/admin/pending").json()
        assert bob.transaction_id not in [r["transaction_id"] for r in listed]
    finally:
        stop_checked(srv)
    assert certificates_for(pca, bob.transaction_id) == []
    cli = pending_cli(pca, "approve", str(row["id"]))
    assert cli.returncode == 2 and "already rejected" in cli.stderr


def test_admin_api_needs_the_token(pca: DevCa, pserver: Server) -> None:
    for token, scheme in ((None, "Bearer"), ("wrong-token-0123456789", "Bearer"), (TOKEN, "Basic")):
        for method, path in (
            ("GET", "/admin/pending"),
            ("POST", "/admin/pending/1/approve"),
            ("POST", "/admin/pending/1/reject"),
        ):
            response = admin(pserver.url, method, path, token, scheme)
            assert response.status_code == 401, (token, scheme, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in response.text
    assert admin(pserver.url, "GET", "/admin/pending").status_code == 200
    assert admin(pserver.url, "POST", "/admin/pending").status_code == 405
    assert admin(pserver.url, "GET", "/admin/pending/1/approve").status_code == 405
    assert admin(pserver.url, "DELETE", "/admin/pending/1/reject", None).status_code == 401


def test_admin_api_disabled_without_token(dev_ca: DevCa, server: Server) -> None:
    assert load_settings(dev_ca.config).admin.token is None
    for token in (None, TOKEN):
        assert admin(server.url, "GET", "/admin/pending", token).status_code == 404
        assert admin(server.url, "POST", "/admin/pending/1/approve", token).status_code == 404
        assert admin(server.url, "GET", "/admin/pending/1/reject", token).status_code == 404
        assert admin(server.url, "PUT", "/admin/pending", token).status_code == 404


def variant(ca: DevCa, name: str, old: str, new: str) -> Path:
    """A copy of the CA's config (same directory, so relative paths hold) with one change."""
    text = ca.config.read_text()
    assert old in text
    config = ca.directory / f"{name}.toml"
    config.write_text(text.replace(old, new, 1))
    return config


def test_admin_token_from_env(pca: DevCa) -> None:
    env_token = "from-the-environment-0123"
    config = variant(pca, "env", 'token_file = "admin-token"', 'token_env = "ADMIN_TOK"')
    settings = load_settings(config, {"ADMIN_TOK": env_token})
    assert settings.admin.token == env_token
    assert env_token not in repr(settings)
    assert load_settings(config, {}).admin.token is None


# ---- refusals: expiry, a wrong challenge, another requester ---------------------------------


def test_expired_pending_request_is_refused(pca: DevCa, pserver: Server) -> None:
    carol = Requester(pca, get_ca_certs(pserver.url), "carol")
    assert carol.pkcs_req(pserver.url).pki_status == PENDING
    old = (datetime.now(UTC) - timedelta(hours=TTL_HOURS, minutes=1)).isoformat()
    with closing(sqlite3.connect(pca.settings.store.path)) as db, db:
        db.execute(
            "UPDATE pending_requests SET created_at = ? WHERE transaction_id = ?",
            (old, carol.transaction_id),
        )
    polled = carol.poll(pserver.url)
    assert (polled.pki_status, polled.fail_info) == (FAILURE, BAD_REQUEST)
    resent = carol.pkcs_req(pserver.url)
    assert (resent.pki_status, resent.fail_info) == (FAILURE, BAD_REQUEST)
    row = row_for(admin(pserver.url, "GET", "/admin/pending").json(), carol.transaction_id)
    assert row["expired"] is True and row["age_seconds"] >= TTL_HOURS * 3600
    assert row_for(cli_list(pca), carol.transaction_id)["expired"] is True
    assert admin(pserver.url, "POST", f"/admin/pending/{row['id']}/approve").status_code == 409
    cli = pending_cli(pca, "approve", str(row["id"]))
    assert cli.returncode == 2 and "expired" in cli.stderr
    assert certificates_for(pca, carol.transaction_id) == []


def test_wrong_challenge_is_refused_before_it_waits(pca: DevCa, pserver: Server) -> None:
    dave = Requester(pca, get_ca_certs(pserver.url), "dave")
    refused = dave.pkcs_req(pserver.url, challenge="not-the-challenge")
    assert (refused.pki_status, refused.fail_info) == (FAILURE, BAD_REQUEST)
    assert (
        stored(
            pca, "SELECT id FROM pending_requests WHERE transaction_id = ?", (dave.transaction_id,)
        )
        == []
    )


def test_poll_by_another_key_is_refused(pca: DevCa, pserver: Server) -> None:
    ca_certs = get_ca_certs(pserver.url)
    erin = Requester(pca, ca_certs, "erin")
    assert erin.pkcs_req(pserver.url).pki_status == PENDING
    mallory = Requester(pca, ca_certs, "mallory")
    mallory.transaction_id = erin.transaction_id
    polled = mallory.poll(pserver.url)
    assert (polled.pki_status, polled.fail_info) == (FAILURE, BAD_REQUEST)
    row = row_for(cli_list(pca), erin.transaction_id)
    assert pending_cli(pca, "approve", str(row["id"])).returncode == 0
    polled = mallory.poll(pserver.url)
    assert (polled.pki_status, polled.fail_info) == (FAILURE, BAD_REQUEST)
    assert certificates_for(pca, erin.transaction_id) == []
    erin.check_certificate(erin.poll(pserver.url))


def test_unknown_ids_on_the_cli(pca: DevCa) -> None:
    for action in ("approve", "reject"):
        result = pending_cli(pca, action, "424242")
        assert result.returncode == 2 and "no pending request with id 424242" in result.stderr


# ---- automatic approval: polls still work, nothing waits ----------------------------------


def test_auto_approval_poll_returns_issued_certificate(dev_ca: DevCa, server: Server) -> None:
    ca_certs = get_ca_certs(server.url)
    frank = Requester(dev_ca, ca_certs, "frank")
    cert = frank.check_certificate(frank.pkcs_req(server.url))
    assert frank.check_certificate(frank.poll(server.url)) == cert
    stranger = Requester(dev_ca, ca_certs, "stranger")
    polled = stranger.poll(server.url)
    assert (polled.pki_status, polled.fail_info) == (FAILURE, BAD_REQUEST)
    assert stored(dev_ca, "SELECT COUNT(*) FROM pending_requests") == [(0,)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('approval = "sometimes"', "enroll.approval must be auto or manual"),
        ("pending_ttl_hours = 0", "enroll.pending_ttl_hours must be at least 1"),
    ],
)
def test_enroll_settings_checked(pca: DevCa, line: str, message: str) -> None:
    config = variant(pca, "bad", f"pending_ttl_hours = {TTL_HOURS}\n", "")
    config.write_text(config.read_text().replace('approval = "manual"', line, 1))
    with pytest.raises(ConfigError, match=message):
        load_settings(config, {})


def test_admin_token_must_not_be_inline_or_short(pca: DevCa) -> None:
    inline = variant(pca, "inline", 'token_file = "admin-token"', f'token = "{TOKEN}"')
    with pytest.raises(ConfigError, match="admin.token must not be written"):
        load_settings(inline, {})
    short = variant(pca, "short", 'token_file = "admin-token"', 'token_env = "T"')
    with pytest.raises(ConfigError, match="too short"):
        load_settings(short, {"T": "short"})


# ---- micromdm's scepclient against a manual-approval server --------------------------------


def test_scepclient_pending_then_approved(pca: DevCa, pserver: Server, tmp_path: Path) -> None:
    if SCEPCLIENT is None:
        pytest.skip("scepclient not installed (apt-get install scep)")
    command = [
        SCEPCLIENT,
        "-server-url", f"{pserver.url}/scep",
        "-challenge", pca.challenge,
        "-private-key", str(tmp_path / "client.key"),
        "-certificate", str(tmp_path / "client.pem"),
        "-cn", "scepclient-pending",
    ]  # fmt: skip
    log = tmp_path / "first.log"
    with log.open("wb") as out:
        first = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        # scepclient answers PENDING by sleeping 30 s and sending its PKCSReq again (same
        # transactionID, derived from its key); waiting for that would only slow the suite.
        deadline = time.monotonic() + 60
        while "pkiStatus=PENDING" not in log.read_text() and time.monotonic() < deadline:
            assert first.poll() is None, log.read_text()
            time.sleep(0.2)
        assert "pkiStatus=PENDING" in log.read_text()
    finally:
        first.kill()
        first.wait(timeout=10)
    assert not (tmp_path / "client.pem").exists()
    [row] = [r for r in cli_list(pca) if "CN=scepclient-pending" in r["subject"]]
    assert row["key"] == "RSA 2048" and row["requester_ip"] == "127.0.0.1"
    assert pending_cli(pca, "approve", str(row["id"])).returncode == 0
    # Run again with the same key: the same transactionID, and now the certificate.
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    pem = tmp_path / "client.pem"
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pca.settings.ca.cert), str(pem)],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    assert certificates_for(pca, row["transaction_id"]) == [cert.serial_number]


# ---- the store: migration 3 keeps what migration 2 stored ----------------------------------


def test_migration_3_and_pending_decisions_in_the_store(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite3"
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        for statement in (*_MIGRATIONS[0], *_MIGRATIONS[1]):
            db.execute(statement)
        db.execute("PRAGMA user_version = 2")
        db.execute(
            "INSERT INTO certificates (serial, subject, sans_json, not_before, not_after,"
            " transaction_id, requester_fingerprint, public_key_sha256, der, status, issued_at)"
            " VALUES (?, 'CN=old', '[]', ?, ?, 't-old', 'f', 'k', x'30', 'issued', ?)",
            (format(0xABC, "040x"), "2026-01-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00",
             "2026-01-01T00:00:00+00:00"),
        )  # fmt: skip
    t0 = datetime(2026, 5, 1, tzinfo=UTC)

    def ttl(profile: str) -> timedelta:
        return timedelta(hours=TTL_HOURS)

    def request(tid: str, at: datetime) -> PendingRequest:
        return PendingRequest(
            transaction_id=tid,
            csr_der=b"\x30\x00",
            requester_fingerprint="f" * 64,
            requester_key_sha256="k" * 64,
            requester_ip="192.0.2.7",
            subject=f"CN={tid}",
            sans=("DNS:a.example", "IP:192.0.2.8"),
            key_description="EC secp256r1",
            created_at=at,
        )

    async def scenario() -> None:
        store = await CertStore.open(path)
        try:
            old = await store.get_by_serial(0xABC)
            assert old is not None and old.subject == "CN=old"
            first = await store.add_pending(request("t1", t0))
            assert (first.id, first.status, first.sans) == (1, "pending", request("t1", t0).sans)
            # The same transactionID again is the stored request, not a second one.
            again = await store.add_pending(request("t1", t0 + timedelta(minutes=5)))
            assert again == first
            second = await store.add_pending(request("t2", t0 + timedelta(minutes=1)))
            assert [p.transaction_id for p in await store.pending_requests()] == ["t1", "t2"]
            approved, changed = await store.decide_pending(first.id, "approved", t0, ttl)
            assert changed and approved.status == "approved" and approved.decided_at == t0
            assert (await store.decide_pending(first.id, "approved", t0, ttl))[1] is False
            with pytest.raises(RequestConflict, match="already approved"):
                await store.decide_pending(first.id, "rejected", t0, ttl)
            late = t0 + ttl("default") + timedelta(minutes=1)
            with pytest.raises(RequestConflict, match="expired"):
                await store.decide_pending(second.id, "approved", late, ttl)
            with pytest.raises(UnknownRequest):
                await store.decide_pending(99, "rejected", t0, ttl)
            await store.mark_pending_issued(first.id)
            issued = await store.get_pending("t1")
            assert issued is not None and issued.status == "issued"
            assert (await store.decide_pending(first.id, "approved", t0, ttl))[1] is False
            assert [p.transaction_id for p in await store.pending_requests()] == ["t2"]
            assert (await store.get_pending_by_id(second.id)) == second
        finally:
            await store.close()

    asyncio.run(scenario())
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert SCHEMA_VERSION >= 3
