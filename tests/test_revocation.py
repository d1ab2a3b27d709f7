"""Revocation, CRLs, GetCert and GetCRL: the CLI, the app in process (software keys), SQLite.

Revocations are made by `hsmscep revoke` in its own process, as an operator would, while the
app runs; CRLs are checked with cryptography and with `openssl crl`. Several `hsmscep serve`
worker processes on SoftHSM2 serve the one CRL the store published.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import AuthorityInformationAccessOID

from hsmscep.config.settings import load_settings
from hsmscep.errors import ConfigError
from hsmscep.policy.issuance import IssuancePolicy
from hsmscep.policy.profiles import Profile, Profiles
from hsmscep.service.scep import ScepService
from hsmscep.store.records import CrlInfo, CrlStatus, IssuedCert
from hsmscep.store.sqlite import _MIGRATIONS, SCHEMA_VERSION, CertStore
from hsmscep.testing import client
from tests.conftest import DevCa, Server, Target, http_request, openssl_serial, start_server
from tests.conftest import post_pki_message as post
from tests.inprocess import CaCerts, SoftCa, ca_certificate, serve, soft_ca, soft_pool

BASE_URL = "http://pki.example.test/hsmscep"
SUCCESS, FAILURE = "0", "2"
BAD_MESSAGE_CHECK, BAD_CERT_ID = "1", "4"
GET_CERT, GET_CRL = "21", "22"
TIMEOUT = 30.0


# ---- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def rca(tmp_path_factory: pytest.TempPathFactory) -> SoftCa:
    """A CA of its own, with a public base URL (trailing slash on purpose) and 6 h CRLs."""
    extra = f'\n[crl]\nbase_url = "{BASE_URL}/"\nnext_update_hours = 6\n'
    return soft_ca(tmp_path_factory.mktemp("revocation"), "revoke-ca", extra_config=extra)


@pytest.fixture(scope="module")
def rserver(rca: SoftCa) -> Iterator[httpx.Client]:
    with serve(rca) as http:
        yield http


@pytest.fixture(scope="module")
def ca_certs(rserver: httpx.Client) -> list[x509.Certificate]:
    response = rserver.get("/scep", params={"operation": "GetCACert"})
    return client.parse_ca_certs(response.content)


def enroll(
    url: Target, ca: DevCa | SoftCa, ca_certs: Sequence[x509.Certificate], cn: str
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(65537, 2048)
    request = client.build_pkcs_req(
        key=key,
        ca_certs=ca_certs,
        challenge=ca.challenge,
        subject=x509.Name.from_rfc4514_string(f"CN={cn}"),
    )
    result = client.open_cert_rep(post(url, request.der), request, ca_certs)
    assert (result.pki_status, result.fail_info) == (SUCCESS, None)
    [cert] = result.certificates
    cert.verify_directly_issued_by(ca_certs[0])
    return cert, key


def query(
    url: Target,
    ca_certs: Sequence[x509.Certificate],
    serial: int,
    message_type: str,
    *,
    issuer: x509.Certificate | None = None,
    key: rsa.RSAPrivateKey | None = None,
    signer: x509.Certificate | None = None,
) -> client.CertRepResult:
    """A GetCert or GetCRL over SCEP, its CertRep verified and opened by the client."""
    request = client.build_cert_query(
        key=key or rsa.generate_private_key(65537, 2048),
        ca_certs=ca_certs,
        issuer=issuer or ca_certs[0],
        serial=serial,
        message_type=message_type,
        signer_cert=signer,
    )
    result = client.open_cert_rep(post(url, request.der), request, ca_certs)
    assert result.signer_cert == ca_certs[1]  # signed by the RA, like every CertRep
    return result


def revoke(ca: DevCa | SoftCa, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmscep", "revoke", "--config", str(ca.config), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def http_crl(url: Target) -> tuple[bytes, x509.CertificateRevocationList]:
    response = http_request(url, "GET", "/crl/ca.crl", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pkix-crl"
    return response.content, x509.load_der_x509_crl(response.content)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def reason_of(crl: x509.CertificateRevocationList, serial: int) -> x509.ReasonFlags | None:
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None, f"{serial:x} is not on CRL {crl_number(crl)}"
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def openssl_crl(der: bytes, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "crl.der"
    path.write_bytes(der)
    return subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(path), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


# ---- certificates point to the CRL and the CA certificate -----------------------------------


def test_issued_certificates_carry_crl_dp_and_aia(
    rca: SoftCa, rserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    cert, _ = enroll(rserver, rca, ca_certs, "with-urls")
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert not dp.critical
    [point] = dp.value
    assert point.full_name == [x509.UniformResourceIdentifier(f"{BASE_URL}/crl/ca.crl")]
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [(a.access_method, a.access_location) for a in aia] == [
        (
            AuthorityInformationAccessOID.CA_ISSUERS,
            x509.UniformResourceIdentifier(f"{BASE_URL}/ca.crt"),
        )
    ]
    # What those URLs name is served here (base_url is the public prefix of these paths).
    response = rserver.get("/ca.crt")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/pkix-cert"
    assert x509.load_der_x509_certificate(response.content) == ca_certs[0]
    http_crl(rserver)


@pytest.mark.hsm
def test_without_base_url_no_crl_dp_or_aia(dev_ca: DevCa, server: Server, tmp_path: Path) -> None:
    assert dev_ca.settings.crl.base_url is None
    certs = client.parse_ca_certs(
        httpx.get(f"{server.url}/scep", params={"operation": "GetCACert"}).content
    )
    cert, _ = enroll(server.url, dev_ca, certs, "no-urls")
    for extension in (x509.CRLDistributionPoints, x509.AuthorityInformationAccess):
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(extension)
    # The CRL is served all the same, signed by this CA.
    _, crl = http_crl(server.url)
    assert crl.is_signature_valid(certs[0].public_key())  # type: ignore[arg-type]


# ---- revocation by the CLI, the HTTP CRL ------------------------------------------------------


def test_cli_revocation_reaches_the_running_servers_crl(
    rca: SoftCa, rserver: httpx.Client, ca_certs: list[x509.Certificate], tmp_path: Path
) -> None:
    cert, _ = enroll(rserver, rca, ca_certs, "to-revoke")
    _, before = http_crl(rserver)
    assert before.get_revoked_certificate_by_serial_number(cert.serial_number) is None

    done = revoke(rca, "--serial", f"{cert.serial_number:x}", "--reason", "keyCompromise")
    assert done.returncode == 0, done.stderr
    assert f"revoked {cert.serial_number:x} (keyCompromise)" in done.stdout
    audit = [json.loads(line.split("hsmscep.audit ", 1)[1]) for line in done.stderr.splitlines()
             if "hsmscep.audit " in line]  # fmt: skip
    assert [(a["event"], a["serial"], a["outcome"]) for a in audit] == [
        ("revoke", openssl_serial(cert), "revoked")
    ]

    der, after = http_crl(rserver)
    assert crl_number(after) > crl_number(before)
    assert reason_of(after, cert.serial_number) == x509.ReasonFlags.key_compromise
    assert after.is_signature_valid(ca_certs[0].public_key())  # type: ignore[arg-type]
    assert after.issuer == ca_certs[0].subject
    assert after.next_update_utc - after.last_update_utc == timedelta(hours=6)  # type: ignore[operator]
    aki = after.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_certs[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest

    ca_pem = str(rca.ca_cert)
    verified = openssl_crl(der, tmp_path, "-CAfile", ca_pem, "-verify", "-noout")
    assert verified.returncode == 0 and "verify OK" in verified.stderr, verified
    text = openssl_crl(der, tmp_path, "-text", "-noout")
    assert text.returncode == 0, text.stderr
    assert re.search(rf"Serial Number: 0*{cert.serial_number:X}\n", text.stdout), text.stdout
    assert "Key Compromise" in text.stdout
    # The check can fail: the same CRL does not verify against another certificate.
    ra_pem = str(rca.ra_cert)
    refused = openssl_crl(der, tmp_path, "-CAfile", ra_pem, "-verify", "-noout")
    assert "verify OK" not in refused.stderr, refused

    # A relying party's check: openssl refuses the certificate with this CRL, and accepts
    # one that was not revoked.
    (tmp_path / "crl.pem").write_bytes(after.public_bytes(Encoding.PEM))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    good, _ = enroll(rserver, rca, ca_certs, "not-revoked")
    (tmp_path / "good.pem").write_bytes(good.public_bytes(Encoding.PEM))
    crl_pem = str(tmp_path / "crl.pem")
    check = ["openssl", "verify", "-crl_check", "-CAfile", ca_pem, "-CRLfile", crl_pem]
    refused_cert = subprocess.run([*check, str(tmp_path / "cert.pem")], capture_output=True)
    output = (refused_cert.stdout + refused_cert.stderr).decode()
    assert refused_cert.returncode != 0 and "certificate revoked" in output, output
    accepted = subprocess.run([*check, str(tmp_path / "good.pem")], capture_output=True)
    assert accepted.returncode == 0 and b": OK" in accepted.stdout, accepted

    with closing(sqlite3.connect(rca.db_path)) as db:
        row = db.execute(
            "SELECT status, revocation_reason, revoked_at FROM certificates WHERE serial = ?",
            (format(cert.serial_number, "040x"),),
        ).fetchone()
    assert row[:2] == ("revoked", "keyCompromise") and row[2] is not None


def test_revoking_twice_is_idempotent(
    rca: SoftCa, rserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    cert, _ = enroll(rserver, rca, ca_certs, "twice")
    serial = f"{cert.serial_number:X}"  # upper case and colons are accepted too
    first = revoke(rca, "--serial", ":".join(re.findall("..?", serial)), "--reason", "superseded")
    assert first.returncode == 0, first.stderr
    _, crl = http_crl(rserver)
    second = revoke(rca, "--serial", f"0x{serial}", "--reason", "keyCompromise")
    assert second.returncode == 0, second.stderr
    assert "already revoked (superseded)" in second.stdout
    _, again = http_crl(rserver)
    assert crl_number(again) == crl_number(crl)  # nothing changed, no new CRL
    assert reason_of(again, cert.serial_number) == x509.ReasonFlags.superseded


def test_unspecified_reason_has_no_reason_code(
    rca: SoftCa, rserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    cert, _ = enroll(rserver, rca, ca_certs, "unspecified")
    done = revoke(rca, "--serial", f"{cert.serial_number:x}")
    assert done.returncode == 0, done.stderr
    _, crl = http_crl(rserver)
    assert reason_of(crl, cert.serial_number) is None  # RFC 5280 §5.3.1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--serial", "1234abcd"), "no certificate with serial 1234abcd"),
        (("--serial", "xyz"), "not a hexadecimal serial"),
        (("--serial", "0"), "positive"),
        (("--serial", "01", "--reason", "removeFromCRL"), "unknown revocation reason"),
        (("--serial", "01", "--reason", "stolen"), "unknown revocation reason"),
    ],
)
def test_revoke_refusals_exit_2(
    rca: SoftCa, rserver: httpx.Client, args: tuple[str, ...], message: str
) -> None:
    revision = revision_of(rca)
    done = revoke(rca, *args)
    assert done.returncode == 2, done
    assert message in done.stderr and "Traceback" not in done.stderr
    assert revision_of(rca) == revision


@pytest.mark.hsm
def test_crl_and_ca_cert_urls_are_get_and_head_only(server: Server) -> None:
    """On a real uvicorn: it is the HTTP server that drops a HEAD answer's body."""
    for path in ("/crl/ca.crl", "/ca.crt"):
        head = httpx.head(f"{server.url}{path}", timeout=TIMEOUT)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) > 100
        assert httpx.post(f"{server.url}{path}", timeout=TIMEOUT).status_code == 405


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('base_url = "ldap://pki.example.test"', "crl.base_url must be an http"),
        ("next_update_hours = 0", "crl.next_update_hours must be at least 1"),
    ],
)
def test_crl_settings_are_checked(rca: SoftCa, section: str, message: str) -> None:
    bad = rca.directory / "bad-crl.toml"
    bad.write_text(rca.config.read_text().split("\n[crl]")[0] + f"\n[crl]\n{section}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(bad)


def revision_of(ca: SoftCa) -> int:
    with closing(sqlite3.connect(ca.db_path)) as db:
        return int(db.execute("SELECT revision FROM revocation_state").fetchone()[0])


@pytest.mark.hsm
def test_several_worker_processes_serve_one_crl(dev_ca: DevCa, server: Server) -> None:
    """Two more processes on the same store: all serve the CLI's revocation, one CRL."""
    ca_certs = client.parse_ca_certs(
        httpx.get(f"{server.url}/scep", params={"operation": "GetCACert"}).content
    )
    workers = start_server(dev_ca, args=("--workers", "2"))
    try:
        cert, _ = enroll(workers.url, dev_ca, ca_certs, "multi-worker")
        http_crl(workers.url)
        done = revoke(dev_ca, "--serial", f"{cert.serial_number:x}", "--reason", "cACompromise")
        assert done.returncode == 0, done.stderr
        # Each request on a new connection: the kernel spreads them over the processes.
        bodies = {http_crl(workers.url)[0] for _ in range(12)}
        bodies.add(http_crl(server.url)[0])
    finally:
        assert workers.stop() == 0
    assert "Traceback" not in workers.output()
    assert len(bodies) == 1  # every process serves the one CRL the store published
    crl = x509.load_der_x509_crl(bodies.pop())
    assert reason_of(crl, cert.serial_number) == x509.ReasonFlags.ca_compromise


# ---- GetCert and GetCRL over SCEP -------------------------------------------------------------


def test_get_cert_returns_the_certificate(
    rca: SoftCa, rserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    cert, key = enroll(rserver, rca, ca_certs, "get-cert")
    # As clients do it: signed with the certificate in question.
    result = query(rserver, ca_certs, cert.serial_number, GET_CERT, key=key, signer=cert)
    assert (result.pki_status, result.fail_info) == (SUCCESS, None)
    assert result.certificates == [cert] and result.crls == []
    # And from anyone else (a throwaway signer): certificates are public.
    other = query(rserver, ca_certs, cert.serial_number, GET_CERT)
    assert other.certificates == [cert]


@pytest.mark.parametrize("message_type", [GET_CERT, GET_CRL])
def test_unknown_certificate_or_foreign_issuer_is_bad_cert_id(
    rca: SoftCa, rserver: httpx.Client, ca_certs: list[x509.Certificate], message_type: str
) -> None:
    if message_type == GET_CERT:
        result = query(rserver, ca_certs, 0x1234ABCD, message_type)
        assert (result.pki_status, result.fail_info) == (FAILURE, BAD_CERT_ID)
        assert result.certificates == [] and result.crls == []
    # A serial we did issue, but named under another CA's name: not ours either.
    cert, _ = enroll(rserver, rca, ca_certs, f"foreign-issuer-{message_type}")
    foreign = ca_certificate(
        rsa.generate_private_key(65537, 2048), x509.Name.from_rfc4514_string("CN=test CA other")
    )
    result = query(rserver, ca_certs, cert.serial_number, message_type, issuer=foreign)
    assert (result.pki_status, result.fail_info) == (FAILURE, BAD_CERT_ID)


def test_query_without_issuer_and_serial_is_bad_message_check(
    rca: SoftCa, rserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    """A GetCert whose envelope holds a CSR, not an IssuerAndSerialNumber."""
    key = rsa.generate_private_key(65537, 2048)
    request = client.build_pkcs_req(
        key=key,
        ca_certs=ca_certs,
        challenge=rca.challenge,
        subject=x509.Name.from_rfc4514_string("CN=confused"),
        message_type=GET_CERT,
    )
    result = client.open_cert_rep(post(rserver, request.der), request, ca_certs)
    assert (result.pki_status, result.fail_info) == (FAILURE, BAD_MESSAGE_CHECK)


def test_get_crl_returns_the_current_crl(
    rca: SoftCa, rserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    revoked, _ = enroll(rserver, rca, ca_certs, "get-crl-revoked")
    mine, key = enroll(rserver, rca, ca_certs, "get-crl-asker")
    done = revoke(rca, "--serial", f"{revoked.serial_number:x}", "--reason", "superseded")
    assert done.returncode == 0, done.stderr

    result = query(rserver, ca_certs, mine.serial_number, GET_CRL, key=key, signer=mine)
    assert (result.pki_status, result.fail_info) == (SUCCESS, None)
    assert result.certificates == []
    [crl] = result.crls
    assert crl.is_signature_valid(ca_certs[0].public_key())  # type: ignore[arg-type]
    assert reason_of(crl, revoked.serial_number) == x509.ReasonFlags.superseded
    assert crl.get_revoked_certificate_by_serial_number(mine.serial_number) is None
    # The same CRL as over HTTP.
    assert crl.public_bytes(Encoding.DER) == http_crl(rserver)[0]


@pytest.mark.parametrize("serial", ["ca", 0x1234ABCD], ids=["ca-certificate", "unknown-serial"])
def test_get_crl_naming_our_ca_returns_the_crl(
    rserver: httpx.Client, ca_certs: list[x509.Certificate], serial: str | int
) -> None:
    """sscep's plain getcrl names the CA certificate itself; any serial under our name will do."""
    ca = ca_certs[0]
    asked = ca.serial_number if serial == "ca" else int(serial)
    result = query(rserver, ca_certs, asked, GET_CRL, issuer=ca)
    assert (result.pki_status, result.fail_info) == (SUCCESS, None)
    [crl] = result.crls
    assert crl.issuer == ca.subject
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]


# ---- the store: migration 2 and the CRL schedule ----------------------------------------------


def test_migration_2_keeps_existing_certificates(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        for statement in _MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute(
            "INSERT INTO certificates VALUES (?, 'CN=old', '[]', ?, ?, 't-old', 'f', 'k', x'30',"
            " 'issued', ?)",
            (format(0xABC, "040x"), "2026-01-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00",
             "2026-01-01T00:00:00+00:00"),
        )  # fmt: skip

    async def scenario() -> None:
        store = await CertStore.open(path)
        try:
            old = await store.get_by_serial(0xABC)
            assert old is not None and old.status == "issued"
            assert (await store.crl_status()).revision == 0
            at = datetime(2026, 2, 1, tzinfo=UTC)
            revocation, changed = await store.revoke(0xABC, "affiliationChanged", at)
            assert changed and revocation.revoked_at == at
            assert (await store.crl_status()).revision == 1
            assert [r.serial for r in await store.revocations()] == [0xABC]
            revoked = await store.get_by_serial(0xABC)
            assert revoked is not None and revoked.status == "revoked"
        finally:
            await store.close()

    asyncio.run(scenario())
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert SCHEMA_VERSION >= 2


def test_crl_numbers_are_published_once(tmp_path: Path) -> None:
    """The race between processes is settled by the store: the first CRL of a number wins."""
    t0 = datetime(2026, 3, 1, tzinfo=UTC)

    async def scenario() -> None:
        first = await CertStore.open(tmp_path / "crls.sqlite3")
        second = await CertStore.open(tmp_path / "crls.sqlite3")
        try:
            info = CrlInfo(1, 0, t0, t0 + timedelta(hours=1))
            assert await first.put_crl(info, b"winner")
            assert not await second.put_crl(info, b"loser")
            assert await second.get_crl(1) == b"winner"
            status = await second.crl_status()
            assert status == CrlStatus(0, info)
            for number in range(2, 21):
                assert await first.put_crl(replace(info, number=number), b"crl %d" % number)
            assert await first.get_crl(20) == b"crl 20"
            assert await first.get_crl(5) is not None and await first.get_crl(4) is None
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())


def record(serial: int, now: datetime) -> IssuedCert:
    return IssuedCert(
        serial=serial,
        subject=f"CN=scheduled-{serial}",
        sans=(),
        not_before=now,
        not_after=now + timedelta(days=30),
        transaction_id=f"scheduled-{serial}",
        requester_fingerprint="f",
        public_key_sha256=f"k{serial}",
        der=b"\x30\x00",
    )


def test_crl_is_resigned_halfway_to_next_update_and_after_revocations(
    rca: SoftCa, tmp_path: Path
) -> None:
    """The service's CRL logic with a software-key pool, the real store and a clock we move."""
    t0 = datetime.now(UTC).replace(microsecond=0)
    now = [t0]
    certs = CaCerts.of(rca)

    async def scenario() -> None:
        store = await CertStore.open(tmp_path / "crl.sqlite3")
        try:
            async with soft_pool(rca) as pool:
                service = ScepService(
                    pool=pool,
                    store=store,
                    ca_cert=certs.ca_cert,
                    ra_certs=[certs.ra_sign_cert],
                    chain=[],
                    policy=IssuancePolicy(challenge=None),
                    profiles=Profiles.of(Profile(name="default", caps=(), challenge_mode="none")),
                    clock=lambda: now[0],
                    crl_lifetime=timedelta(hours=6),
                )
                first = x509.load_der_x509_crl(await service.current_crl())
                assert crl_number(first) == 1 and len(first) == 0
                assert first.last_update_utc == t0 and first.next_update_utc == t0 + timedelta(
                    hours=6
                )
                now[0] = t0 + timedelta(hours=3) - timedelta(seconds=1)
                assert crl_number(x509.load_der_x509_crl(await service.current_crl())) == 1
                now[0] = t0 + timedelta(hours=3)  # half of next_update - this_update
                second = x509.load_der_x509_crl(await service.current_crl())
                assert crl_number(second) == 2 and second.last_update_utc == now[0]

                await store.put(record(0x51, t0))
                await store.revoke(0x51, "privilegeWithdrawn", now[0])
                third = x509.load_der_x509_crl(await service.current_crl())
                assert crl_number(third) == 3
                assert reason_of(third, 0x51) == x509.ReasonFlags.privilege_withdrawn
                assert third.is_signature_valid(certs.ca_cert.public_key())  # type: ignore[arg-type]

                # The background check signs a new CRL after a revocation made elsewhere.
                await store.put(record(0x52, t0))
                await store.revoke(0x52, "cessationOfOperation", now[0])
                async with service.crl_refresher(every=0.01):
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        status = await store.crl_status()
                        if status.latest is not None and status.latest.revision == status.revision:
                            break
                        await asyncio.sleep(0.01)
                status = await store.crl_status()
                assert status.latest is not None and status.latest.number == 4
                der = await store.get_crl(4)
                assert der is not None
                assert reason_of(x509.load_der_x509_crl(der), 0x52) == (
                    x509.ReasonFlags.cessation_of_operation
                )
        finally:
            await store.close()

    asyncio.run(scenario())
