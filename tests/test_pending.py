"""Manual approval: PENDING, CertPoll, approve/reject by the CLI and the admin API.

The app in process (software keys, SQLite); decisions are made by `hsmscep pending` in its
own process or over the admin HTTP API, and the app is restarted between request, decision and
poll to show that pending requests live in the store. micromdm's scepclient waits for an
approval across a restart of a real `hsmscep serve` on SoftHSM2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import replace
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
from tests.conftest import DevCa, Server, Target, http_request, make_ca, start_server
from tests.conftest import post_pki_message as post
from tests.inprocess import SoftCa, serve, soft_ca

SUCCESS, FAILURE, PENDING = "0", "2", "3"
BAD_REQUEST = "2"
TIMEOUT = 30.0
TOKEN = "admin-token-0123456789abcdef"
TTL_HOURS = 2
SCEPCLIENT = shutil.which("scepclient")


# ---- fixtures and helpers -----------------------------------------------------------------


MANUAL = f'validity_days = 365\napproval = "manual"\npending_ttl_hours = {TTL_HOURS}\n'


def make_manual(directory: Path) -> None:
    """Requests wait for approval (TTL 2 h)."""
    config = directory / "hsmscep.toml"
    config.write_text(config.read_text().replace("validity_days = 365\n", MANUAL, 1))


@pytest.fixture(scope="module")
def pca(tmp_path_factory: pytest.TempPathFactory) -> SoftCa:
    """A CA whose requests wait for approval (TTL 2 h), with an admin token in a file."""
    directory = tmp_path_factory.mktemp("pending")
    (directory / "admin-token").write_text(TOKEN + "\n")
    extra = '\n[admin]\ntoken_file = "admin-token"\n'
    ca = soft_ca(directory, "pending-ca", extra_config=extra)
    make_manual(directory)
    settings = load_settings(ca.config)
    assert settings.enroll.approval == "manual" and settings.admin.token == TOKEN
    return replace(ca, settings=settings)


@pytest.fixture(scope="module")
def pserver(pca: SoftCa) -> Iterator[httpx.Client]:
    with serve(pca) as http:
        yield http


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> SoftCa:
    """Automatic approval and no admin token: what `hsmscep dev` writes."""
    return soft_ca(tmp_path_factory.mktemp("pending-plain"), "pending-plain")


@pytest.fixture(scope="module")
def plain_server(plain: SoftCa) -> Iterator[httpx.Client]:
    with serve(plain) as http:
        yield http


@pytest.fixture(autouse=True)
def nothing_secret_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    yield
    assert "Traceback" not in caplog.text
    assert TOKEN not in caplog.text  # neither the admin token nor the challenge is ever logged
    assert "secret-pending-ca" not in caplog.text


def stop_checked(srv: Server) -> None:
    srv.stop()
    output = srv.output()
    assert "Traceback" not in output
    assert TOKEN not in output  # neither the admin token nor the challenge is ever logged
    assert "secret-pending-ca" not in output


def get_ca_certs(url: Target) -> list[x509.Certificate]:
    response = http_request(url, "GET", "/scep", params={"operation": "GetCACert"})
    return client.parse_ca_certs(response.content)


class Requester:
    """One client: a key, its self-signed signer certificate and one transactionID."""

    def __init__(self, ca: DevCa | SoftCa, ca_certs: Sequence[x509.Certificate], cn: str) -> None:
        self.ca, self.ca_certs = ca, list(ca_certs)
        self.key = rsa.generate_private_key(65537, 2048)
        self.subject = x509.Name.from_rfc4514_string(f"CN={cn},O=Pending Test")
        self.signer = client.self_signed_signer(self.key, self.subject)
        self.sans = [x509.DNSName(f"{cn}.example.test")]
        self.transaction_id = f"tx-{cn}"

    def pkcs_req(self, url: Target, challenge: str | None = None) -> client.CertRepResult:
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

    def poll(self, url: Target, cipher: str = "aes256") -> client.CertRepResult:
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


def pending_cli(ca: DevCa | SoftCa, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmscep", "pending", *args, "--config", str(ca.config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_list(ca: DevCa | SoftCa) -> list[dict[str, Any]]:
    listed = pending_cli(ca, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows: list[dict[str, Any]] = json.loads(listed.stdout)
    return rows


def row_for(rows: list[dict[str, Any]], transaction_id: str) -> dict[str, Any]:
    [row] = [r for r in rows if r["transaction_id"] == transaction_id]
    return row


def admin(
    url: Target, method: str, path: str, token: str | None = TOKEN, scheme: str = "Bearer"
) -> httpx.Response:
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    return http_request(url, method, path, headers=headers, timeout=TIMEOUT)


def stored(ca: DevCa | SoftCa, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
    with closing(sqlite3.connect(ca.db_path)) as db:
        return list(db.execute(sql, params))


def certificates_for(ca: DevCa | SoftCa, transaction_id: str) -> list[int]:
    rows = stored(ca, "SELECT serial FROM certificates WHERE transaction_id = ?", (transaction_id,))
    return [int(serial, 16) for (serial,) in rows]


# ---- approve by the CLI, reject by the admin API, across restarts --------------------------


def test_pending_then_approved_by_cli_across_restart(pca: SoftCa) -> None:
    with serve(pca) as srv:
        ca_certs = get_ca_certs(srv)
        alice = Requester(pca, ca_certs, "alice")
        first = alice.pkcs_req(srv)
        assert (first.pki_status, first.fail_info, first.certificates) == (PENDING, None, [])
        assert alice.poll(srv).pki_status == PENDING
        # A re-sent PKCSReq with the same transactionID is the same request, still pending.
        assert alice.pkcs_req(srv).pki_status == PENDING
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

    with serve(pca) as srv:
        cert = alice.check_certificate(alice.poll(srv))
        assert certificates_for(pca, alice.transaction_id) == [cert.serial_number]
        # Later polls and a re-sent PKCSReq get the same certificate, never a second one.
        assert alice.check_certificate(alice.poll(srv, cipher="des3")) == cert
        assert alice.check_certificate(alice.pkcs_req(srv)) == cert
        assert certificates_for(pca, alice.transaction_id) == [cert.serial_number]
    [(status,)] = stored(
        pca, "SELECT status FROM pending_requests WHERE transaction_id = ?", (alice.transaction_id,)
    )
    assert status == "issued"
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pca.ca_cert), "/dev/stdin"],
        input=cert.public_bytes(Encoding.PEM),
        capture_output=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_pending_then_rejected_by_admin_api_across_restart(pca: SoftCa) -> None:
    with serve(pca) as srv:
        ca_certs = get_ca_certs(srv)
        bob = Requester(pca, ca_certs, "bob")
        assert bob.pkcs_req(srv).pki_status == PENDING
    with serve(pca) as srv:
        listed = admin(srv, "GET", "/admin/pending")
        assert listed.status_code == 200
        assert listed.headers["content-type"] == "application/json"
        row = row_for(listed.json(), bob.transaction_id)
        assert row["subject"] == "CN=bob,O=Pending Test"
        assert row["sans"] == ["DNS:bob.example.test"]
        assert row["key"] == "RSA 2048"
        assert row["requester_ip"] == "127.0.0.1"
        assert isinstance(row["age_seconds"], int) and row["age_seconds"] >= 0
        assert bob.poll(srv).pki_status == PENDING

        rejected = admin(srv, "POST", f"/admin/pending/{row['id']}/reject")
        assert rejected.status_code == 200, rejected.text
        assert rejected.json()["status"] == "rejected" and rejected.json()["changed"] is True
        # The decision stands: approving a rejected request is a conflict.
        conflict = admin(srv, "POST", f"/admin/pending/{row['id']}/approve")
        assert conflict.status_code == 409
        missing = admin(srv, "POST", "/admin/pending/999999/approve")
        assert missing.status_code == 404
        assert admin(srv, "POST", "/admin/pending/x1/approve").status_code == 404
    with serve(pca) as srv:
        polled = bob.poll(srv)
        assert (polled.pki_status, polled.fail_info) == (FAILURE, BAD_REQUEST)
        resent = bob.pkcs_req(srv)
        assert (resent.pki_status, resent.fail_info) == (FAILURE, BAD_REQUEST)
        listed = admin(srv, "GET", "/admin/pending").json()
        assert bob.transaction_id not in [r["transaction_id"] for r in listed]
    assert certificates_for(pca, bob.transaction_id) == []
    cli = pending_cli(pca, "approve", str(row["id"]))
    assert cli.returncode == 2 and "already rejected" in cli.stderr


def test_admin_api_needs_the_token(pca: SoftCa, pserver: httpx.Client) -> None:
    for token, scheme in ((None, "Bearer"), ("wrong-token-0123456789", "Bearer"), (TOKEN, "Basic")):
        for method, path in (
            ("GET", "/admin/pending"),
            ("POST", "/admin/pending/1/approve"),
            ("POST", "/admin/pending/1/reject"),
        ):
            response = admin(pserver, method, path, token, scheme)
            assert response.status_code == 401, (token, scheme, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in response.text
    assert admin(pserver, "GET", "/admin/pending").status_code == 200
    assert admin(pserver, "POST", "/admin/pending").status_code == 405
    assert admin(pserver, "GET", "/admin/pending/1/approve").status_code == 405
    assert admin(pserver, "DELETE", "/admin/pending/1/reject", None).status_code == 401


def test_admin_api_disabled_without_token(plain: SoftCa, plain_server: httpx.Client) -> None:
    assert load_settings(plain.config).admin.token is None
    for token in (None, TOKEN):
        assert admin(plain_server, "GET", "/admin/pending", token).status_code == 404
        assert admin(plain_server, "POST", "/admin/pending/1/approve", token).status_code == 404
        assert admin(plain_server, "GET", "/admin/pending/1/reject", token).status_code == 404
        assert admin(plain_server, "PUT", "/admin/pending", token).status_code == 404


def variant(ca: SoftCa, name: str, old: str, new: str) -> Path:
    """A copy of the CA's config (same directory, so relative paths hold) with one change."""
    text = ca.config.read_text()
    assert old in text
    config = ca.directory / f"{name}.toml"
    config.write_text(text.replace(old, new, 1))
    return config


def test_admin_token_from_env(pca: SoftCa) -> None:
    env_token = "from-the-environment-0123"
    config = variant(pca, "env", 'token_file = "admin-token"', 'token_env = "ADMIN_TOK"')
    settings = load_settings(config, {"ADMIN_TOK": env_token})
    assert settings.admin.token == env_token
    assert env_token not in repr(settings)
    assert load_settings(config, {}).admin.token is None


# ---- refusals: expiry, a wrong challenge, another requester ---------------------------------


def test_expired_pending_request_is_refused(pca: SoftCa, pserver: httpx.Client) -> None:
    carol = Requester(pca, get_ca_certs(pserver), "carol")
    assert carol.pkcs_req(pserver).pki_status == PENDING
    old = (datetime.now(UTC) - timedelta(hours=TTL_HOURS, minutes=1)).isoformat()
    with closing(sqlite3.connect(pca.db_path)) as db, db:
        db.execute(
            "UPDATE pending_requests SET created_at = ? WHERE transaction_id = ?",
            (old, carol.transaction_id),
        )
    polled = carol.poll(pserver)
    assert (polled.pki_status, polled.fail_info) == (FAILURE, BAD_REQUEST)
    resent = carol.pkcs_req(pserver)
    assert (resent.pki_status, resent.fail_info) == (FAILURE, BAD_REQUEST)
    row = row_for(admin(pserver, "GET", "/admin/pending").json(), carol.transaction_id)
    assert row["expired"] is True and row["age_seconds"] >= TTL_HOURS * 3600
    assert row_for(cli_list(pca), carol.transaction_id)["expired"] is True
    assert admin(pserver, "POST", f"/admin/pending/{row['id']}/approve").status_code == 409
    cli = pending_cli(pca, "approve", str(row["id"]))
    assert cli.returncode == 2 and "expired" in cli.stderr
    assert certificates_for(pca, carol.transaction_id) == []


def test_wrong_challenge_is_refused_before_it_waits(pca: SoftCa, pserver: httpx.Client) -> None:
    dave = Requester(pca, get_ca_certs(pserver), "dave")
    refused = dave.pkcs_req(pserver, challenge="not-the-challenge")
    assert (refused.pki_status, refused.fail_info) == (FAILURE, BAD_REQUEST)
    assert (
        stored(
            pca, "SELECT id FROM pending_requests WHERE transaction_id = ?", (dave.transaction_id,)
        )
        == []
    )


def test_poll_by_another_key_is_refused(pca: SoftCa, pserver: httpx.Client) -> None:
    ca_certs = get_ca_certs(pserver)
    erin = Requester(pca, ca_certs, "erin")
    assert erin.pkcs_req(pserver).pki_status == PENDING
    mallory = Requester(pca, ca_certs, "mallory")
    mallory.transaction_id = erin.transaction_id
    polled = mallory.poll(pserver)
    assert (polled.pki_status, polled.fail_info) == (FAILURE, BAD_REQUEST)
    row = row_for(cli_list(pca), erin.transaction_id)
    assert pending_cli(pca, "approve", str(row["id"])).returncode == 0
    polled = mallory.poll(pserver)
    assert (polled.pki_status, polled.fail_info) == (FAILURE, BAD_REQUEST)
    assert certificates_for(pca, erin.transaction_id) == []
    erin.check_certificate(erin.poll(pserver))


def test_unknown_ids_on_the_cli(pca: SoftCa) -> None:
    for action in ("approve", "reject"):
        result = pending_cli(pca, action, "424242")
        assert result.returncode == 2 and "no pending request with id 424242" in result.stderr


# ---- automatic approval: polls still work, nothing waits ----------------------------------


def test_auto_approval_poll_returns_issued_certificate(
    plain: SoftCa, plain_server: httpx.Client
) -> None:
    ca_certs = get_ca_certs(plain_server)
    frank = Requester(plain, ca_certs, "frank")
    cert = frank.check_certificate(frank.pkcs_req(plain_server))
    assert frank.check_certificate(frank.poll(plain_server)) == cert
    stranger = Requester(plain, ca_certs, "stranger")
    polled = stranger.poll(plain_server)
    assert (polled.pki_status, polled.fail_info) == (FAILURE, BAD_REQUEST)
    assert stored(plain, "SELECT COUNT(*) FROM pending_requests") == [(0,)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('approval = "sometimes"', "enroll.approval must be auto or manual"),
        ("pending_ttl_hours = 0", "enroll.pending_ttl_hours must be at least 1"),
    ],
)
def test_enroll_settings_checked(pca: SoftCa, line: str, message: str) -> None:
    config = variant(pca, "bad", f"pending_ttl_hours = {TTL_HOURS}\n", "")
    config.write_text(config.read_text().replace('approval = "manual"', line, 1))
    with pytest.raises(ConfigError, match=message):
        load_settings(config, {})


def test_admin_token_must_not_be_inline_or_short(pca: SoftCa) -> None:
    inline = variant(pca, "inline", 'token_file = "admin-token"', f'token = "{TOKEN}"')
    with pytest.raises(ConfigError, match="admin.token must not be written"):
        load_settings(inline, {})
    short = variant(pca, "short", 'token_file = "admin-token"', 'token_env = "T"')
    with pytest.raises(ConfigError, match="too short"):
        load_settings(short, {"T": "short"})


# ---- micromdm's scepclient against a manual-approval server --------------------------------


@pytest.mark.hsm
@pytest.mark.interop
def test_scepclient_pending_then_approved_across_restart(
    softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Real `hsmscep serve` on SoftHSM2: PENDING, the server stops, `hsmscep pending approve`,
    a new server, and scepclient gets its certificate."""
    if SCEPCLIENT is None:
        pytest.skip("scepclient not installed (apt-get install scep)")
    directory = tmp_path_factory.mktemp("pending-real")
    (directory / "admin-token").write_text(TOKEN + "\n")
    ca = make_ca(
        softhsm_dir, directory, "pending-ca", extra_config='\n[admin]\ntoken_file = "admin-token"\n'
    )
    make_manual(directory)
    srv = start_server(ca)
    command = [
        SCEPCLIENT,
        "-server-url", f"{srv.url}/scep",
        "-challenge", ca.challenge,
        "-private-key", str(tmp_path / "client.key"),
        "-certificate", str(tmp_path / "client.pem"),
        "-cn", "scepclient-pending",
    ]  # fmt: skip
    log = tmp_path / "first.log"
    try:
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
    finally:
        stop_checked(srv)
    assert not (tmp_path / "client.pem").exists()
    [row] = [r for r in cli_list(ca) if "CN=scepclient-pending" in r["subject"]]
    assert row["key"] == "RSA 2048" and row["requester_ip"] == "127.0.0.1"
    assert pending_cli(ca, "approve", str(row["id"])).returncode == 0
    # Run again with the same key against a new server: the same transactionID, and now the
    # certificate.
    srv = start_server(ca)
    try:
        command[2] = f"{srv.url}/scep"
        again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    finally:
        stop_checked(srv)
    assert again.returncode == 0, again.stdout + again.stderr
    pem = tmp_path / "client.pem"
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca.directory / "ca.pem"), str(pem)],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    assert certificates_for(ca, row["transaction_id"]) == [cert.serial_number]


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
