"""Renewal: RenewalReq and certificate-signed PKCSReq, in process (software keys, SQLite).

One CA serves several apps that differ only in their [renewal] settings, given as
HSMSCEP_RENEWAL_* overrides. The renewal window and expiry are checked with the service itself
on a signing pool with software keys, the real store and a clock we move. micromdm's scepclient
renews against real `hsmscep serve` processes on SoftHSM2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsmscep.config.settings import load_settings
from hsmscep.errors import ConfigError, Rejected
from hsmscep.policy.issuance import CertRequest, IssuancePolicy
from hsmscep.policy.profiles import Profile, Profiles
from hsmscep.policy.renewal import (
    RenewalPolicy,
    StoredSigner,
    check_signer,
    names_our_ca,
    renewed_request,
)
from hsmscep.policy.template import DEFAULT_TEMPLATE
from hsmscep.service.scep import ScepService
from hsmscep.store.sqlite import CertStore
from hsmscep.testing import client
from tests.conftest import DevCa, make_ca, software_root, start_server
from tests.inprocess import CaCerts, SoftCa, serve, soft_ca, soft_pool

SUCCESS, FAILURE = "0", "2"
BAD_REQUEST, BAD_CERT_ID = "2", "4"
PKCS_REQ, RENEWAL_REQ = "19", "17"
TIMEOUT = 30.0
SANS: tuple[x509.GeneralName, ...] = (
    x509.DNSName("device-1.example.test"),
    x509.RFC822Name("device-1@example.test"),
)
OTHER_SUBJECT = x509.Name.from_rfc4514_string("CN=someone else,O=Elsewhere")


# ---- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def nca(tmp_path_factory: pytest.TempPathFactory) -> SoftCa:
    return soft_ca(tmp_path_factory.mktemp("renewal"), "renewal-ca")


def _server(ca: SoftCa, env: dict[str, str]) -> Iterator[httpx.Client]:
    with serve(ca, load_settings(ca.config, env)) as http:
        yield http


@pytest.fixture(scope="module")
def default_server(nca: SoftCa) -> Iterator[httpx.Client]:
    """The defaults: enabled, any time before expiry, key reuse allowed, old cert kept."""
    yield from _server(nca, {})


@pytest.fixture(scope="module")
def new_key_server(nca: SoftCa) -> Iterator[httpx.Client]:
    """The default profile requires a new key on renewal (renewal_requires_new_key)."""
    yield from _server(nca, {"HSMSCEP_ENROLL_RENEWAL_REQUIRES_NEW_KEY": "true"})


LENIENT = {"HSMSCEP_RENEWAL_ALLOW_KEY_REUSE": "true", "HSMSCEP_RENEWAL_REVOKE_REPLACED": "yes"}


@pytest.fixture(scope="module")
def lenient_server(nca: SoftCa) -> Iterator[httpx.Client]:
    yield from _server(nca, LENIENT)


@pytest.fixture(scope="module")
def disabled_server(nca: SoftCa) -> Iterator[httpx.Client]:
    yield from _server(nca, {"HSMSCEP_RENEWAL_ENABLED": "false"})


@pytest.fixture(scope="module")
def ca_certs(default_server: httpx.Client) -> list[x509.Certificate]:
    response = default_server.get("/scep", params={"operation": "GetCACert"})
    return client.parse_ca_certs(response.content)


def post(url: httpx.Client, der: bytes) -> bytes:
    response = url.post(
        "/scep?operation=PKIOperation",
        content=der,
        headers={"Content-Type": "application/x-pki-message"},
    )
    assert response.status_code == 200, response.text
    return response.content


def subject(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Renewal Test"),
        ]
    )


def enroll(
    url: httpx.Client, ca: SoftCa, ca_certs: Sequence[x509.Certificate], cn: str
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A first certificate the usual way: self-signed signer and the challenge."""
    key = rsa.generate_private_key(65537, 2048)
    request = client.build_pkcs_req(
        key=key, ca_certs=ca_certs, challenge=ca.challenge, subject=subject(cn), sans=SANS
    )
    result = client.open_cert_rep(post(url, request.der), request, ca_certs)
    assert (result.pki_status, result.fail_info) == (SUCCESS, None)
    [cert] = result.certificates
    return cert, key


def renewal_request(
    ca_certs: Sequence[x509.Certificate],
    old: x509.Certificate,
    old_key: rsa.RSAPrivateKey,
    *,
    message_type: str = RENEWAL_REQ,
    new_key: rsa.RSAPrivateKey | None = None,
    challenge: str | None = None,
    csr_subject: x509.Name = OTHER_SUBJECT,
) -> client.ClientRequest:
    """Signed with the old certificate and key, around a CSR for `new_key` (fresh by default).

    The CSR asks for another subject and no SANs: a renewal keeps the old ones regardless.
    """
    new_key = new_key or rsa.generate_private_key(65537, 2048)
    csr = client.build_csr(new_key, csr_subject, challenge=challenge)
    return client.build_pkcs_req(
        key=old_key,
        ca_certs=ca_certs,
        challenge=None,
        subject=old.subject,
        signer_cert=old,
        message_type=message_type,
        csr=csr,
    )


def send(
    url: httpx.Client, ca_certs: Sequence[x509.Certificate], request: client.ClientRequest
) -> client.CertRepResult:
    result = client.open_cert_rep(post(url, request.der), request, ca_certs)
    assert result.signer_cert == ca_certs[1]  # signed by the RA, like every CertRep
    return result


def renew(
    url: httpx.Client,
    ca_certs: Sequence[x509.Certificate],
    old: x509.Certificate,
    old_key: rsa.RSAPrivateKey,
    *,
    message_type: str = RENEWAL_REQ,
    new_key: rsa.RSAPrivateKey | None = None,
    challenge: str | None = None,
) -> tuple[client.CertRepResult, rsa.RSAPrivateKey]:
    """A renewal sent and its reply opened; also the key the CSR was made for."""
    new_key = new_key or rsa.generate_private_key(65537, 2048)
    request = renewal_request(
        ca_certs, old, old_key, message_type=message_type, new_key=new_key, challenge=challenge
    )
    return send(url, ca_certs, request), new_key


def refusal(result: client.CertRepResult) -> tuple[str, str | None]:
    assert not result.certificates
    return result.pki_status, result.fail_info


def eku(cert: x509.Certificate) -> x509.ExtendedKeyUsage:
    return cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value


def sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def stored(ca: SoftCa | DevCa, serial: int) -> tuple[str, list[str], str, str | None] | None:
    """(subject, SANs, status, revocation reason) as the store has them, read with sqlite3."""
    with closing(sqlite3.connect(ca.directory / "hsmscep.db")) as db:
        row = db.execute(
            "SELECT subject, sans_json, status, revocation_reason FROM certificates"
            " WHERE serial = ?",
            (format(serial, "040x"),),
        ).fetchone()
    if row is None:
        return None
    return row[0], json.loads(row[1]), row[2], row[3]


def transaction_of(ca: SoftCa, serial: int) -> str:
    with closing(sqlite3.connect(ca.db_path)) as db:
        row = db.execute(
            "SELECT transaction_id FROM certificates WHERE serial = ?", (format(serial, "040x"),)
        ).fetchone()
    assert row is not None
    return str(row[0])


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def revoke(ca: SoftCa, serial: int, reason: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hsmscep", "revoke", "--config", str(ca.config)]
        + ["--serial", f"{serial:x}", "--reason", reason],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def caps(url: httpx.Client) -> list[str]:
    response = url.get("/scep", params={"operation": "GetCACaps"})
    assert response.status_code == 200
    return response.text.split()


def assert_renewed(
    result: client.CertRepResult,
    old: x509.Certificate,
    ca_certs: Sequence[x509.Certificate],
    ca: SoftCa,
) -> x509.Certificate:
    """SUCCESS with a new certificate that keeps the old subject, SANs and EKU, and is stored."""
    assert (result.pki_status, result.fail_info) == (SUCCESS, None)
    [new] = result.certificates
    new.verify_directly_issued_by(ca_certs[0])
    assert new.serial_number != old.serial_number
    assert new.subject == old.subject and new.subject != OTHER_SUBJECT
    assert sans(new) == sans(old) == list(SANS)
    assert eku(new) == eku(old)
    assert list(eku(new)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert new.public_key() != old.public_key()
    assert stored(ca, new.serial_number) == (
        old.subject.rfc4514_string(),
        ["DNS:device-1.example.test", "email:device-1@example.test"],
        "issued",
        None,
    )
    return new


# ---- renewal succeeds ---------------------------------------------------------------------


def test_renewal_req_signed_by_issued_certificate(
    nca: SoftCa, default_server: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    old, old_key = enroll(default_server, nca, ca_certs, "renew-17")
    request = renewal_request(ca_certs, old, old_key, new_key=(new_key := new_rsa_key()))
    result = send(default_server, ca_certs, request)
    new = assert_renewed(result, old, ca_certs, nca)
    # Stored under the transactionID and the serial it renews (clients that derive the
    # transactionID from a reused key would otherwise collide with the first enrollment).
    assert transaction_of(nca, new.serial_number) == (
        f"{request.transaction_id} renews {old.serial_number:x}"
    )
    # Defaults: the old certificate stays valid (revoke_replaced = false).
    assert stored(nca, old.serial_number) == (
        old.subject.rfc4514_string(),
        ["DNS:device-1.example.test", "email:device-1@example.test"],
        "issued",
        None,
    )
    # The new certificate renews in turn.
    newer, _ = renew(default_server, ca_certs, new, new_key)
    assert_renewed(newer, new, ca_certs, nca)


def test_pkcs_req_signed_by_issued_certificate_needs_no_challenge(
    nca: SoftCa, default_server: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    """How Cisco, sscep, jscep and macOS renew: a PKCSReq signed with the old certificate."""
    old, old_key = enroll(default_server, nca, ca_certs, "renew-19")
    result, _ = renew(default_server, ca_certs, old, old_key, message_type=PKCS_REQ)
    assert_renewed(result, old, ca_certs, nca)


def test_renewal_ignores_a_wrong_challenge(
    nca: SoftCa, default_server: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    """The signer certificate authenticates a renewal; a stale challenge does not matter."""
    old, old_key = enroll(default_server, nca, ca_certs, "renew-stale-challenge")
    result, _ = renew(default_server, ca_certs, old, old_key, challenge="not the challenge")
    assert_renewed(result, old, ca_certs, nca)


def test_caps_advertise_renewal_by_default(
    default_server: httpx.Client, lenient_server: httpx.Client
) -> None:
    assert "Renewal" in caps(default_server)
    assert "Renewal" in caps(lenient_server)


# ---- who may not renew --------------------------------------------------------------------


@pytest.mark.parametrize("message_type", [RENEWAL_REQ, PKCS_REQ])
def test_revoked_signer_is_refused(
    nca: SoftCa, default_server: httpx.Client, ca_certs: list[x509.Certificate], message_type: str
) -> None:
    old, old_key = enroll(default_server, nca, ca_certs, f"revoked-{message_type}")
    assert renew(default_server, ca_certs, old, old_key)[0].pki_status == SUCCESS
    revoke(nca, old.serial_number, "keyCompromise")
    before = count(nca)
    result, _ = renew(default_server, ca_certs, old, old_key, message_type=message_type)
    assert refusal(result) == (FAILURE, BAD_REQUEST)
    assert count(nca) == before
    # Even with the challenge in the CSR: the revoked signer is not a self-signed enrollment.
    result, _ = renew(
        default_server,
        ca_certs,
        old,
        old_key,
        message_type=message_type,
        challenge=nca.challenge,
    )
    assert refusal(result) == (FAILURE, BAD_REQUEST)


def count(ca: SoftCa) -> int:
    with closing(sqlite3.connect(ca.db_path)) as db:
        return int(db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0])


def test_self_signed_renewal_req_is_refused(
    nca: SoftCa, default_server: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    """A RenewalReq needs a signer we issued; a self-signed one is bad, even with the challenge."""
    key = rsa.generate_private_key(65537, 2048)
    request = client.build_pkcs_req(
        key=key,
        ca_certs=ca_certs,
        challenge=nca.challenge,
        subject=subject("self-signed-renewal"),
        message_type=RENEWAL_REQ,
    )
    assert refusal(send(default_server, ca_certs, request)) == (FAILURE, BAD_REQUEST)


def test_self_signed_pkcs_req_still_needs_the_challenge(
    nca: SoftCa, default_server: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    key = rsa.generate_private_key(65537, 2048)
    for challenge, outcome in ((None, (FAILURE, BAD_REQUEST)), ("wrong", (FAILURE, BAD_REQUEST))):
        request = client.build_pkcs_req(
            key=key, ca_certs=ca_certs, challenge=challenge, subject=subject("self-signed")
        )
        assert refusal(send(default_server, ca_certs, request)) == outcome
    request = client.build_pkcs_req(
        key=key, ca_certs=ca_certs, challenge=nca.challenge, subject=subject("self-signed")
    )
    result = send(default_server, ca_certs, request)
    assert result.pki_status == SUCCESS
    assert result.certificates[0].subject == subject("self-signed")


def forge(
    template: x509.Certificate, key: rsa.RSAPrivateKey, ca: x509.Certificate, serial: int
) -> x509.Certificate:
    """A certificate naming our CA as issuer (and its key id) but signed by another key."""
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(template.subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(rsa.generate_private_key(65537, 2048), hashes.SHA256())
    )


def test_forged_signer_is_refused(
    nca: SoftCa, default_server: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    """Issuer name and key id of our CA, but not our signature: never a renewal."""
    old, _ = enroll(default_server, nca, ca_certs, "forged")
    key = rsa.generate_private_key(65537, 2048)
    for serial in (old.serial_number, x509.random_serial_number()):
        forged = forge(old, key, ca_certs[0], serial)
        for message_type in (RENEWAL_REQ, PKCS_REQ):
            result, _ = renew(
                default_server,
                ca_certs,
                forged,
                key,
                message_type=message_type,
                challenge=nca.challenge,
            )
            assert refusal(result) == (FAILURE, BAD_CERT_ID)


def test_key_reuse_allowed_by_default_refused_where_the_profile_requires_a_new_key(
    nca: SoftCa,
    default_server: httpx.Client,
    new_key_server: httpx.Client,
    ca_certs: list[x509.Certificate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hsmscep.audit")
    old, old_key = enroll(default_server, nca, ca_certs, "reuse-default")
    result, _ = renew(default_server, ca_certs, old, old_key, new_key=old_key)
    assert result.pki_status == SUCCESS
    [new] = result.certificates
    assert new.public_key() == old.public_key() and new.subject == old.subject
    assert stored(nca, old.serial_number)[2] == "issued"  # revoke_replaced is off by default

    result, _ = renew(new_key_server, ca_certs, new, old_key, new_key=old_key)
    assert refusal(result) == (FAILURE, BAD_REQUEST)
    assert any("new key" in r.getMessage() for r in caplog.records)  # the audit line says why
    fresh, _ = renew(new_key_server, ca_certs, new, old_key)
    assert fresh.pki_status == SUCCESS and fresh.certificates[0].public_key() != old.public_key()


# ---- [renewal] settings ---------------------------------------------------------------------


def test_key_reuse_allowed_and_replaced_certificate_revoked_when_configured(
    nca: SoftCa, lenient_server: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    old, old_key = enroll(lenient_server, nca, ca_certs, "reuse-allowed")
    request = renewal_request(ca_certs, old, old_key, new_key=old_key)
    result = send(lenient_server, ca_certs, request)
    assert result.pki_status == SUCCESS
    [new] = result.certificates
    assert new.public_key() == old.public_key() and new.serial_number != old.serial_number
    assert new.subject == old.subject and sans(new) == sans(old) and eku(new) == eku(old)
    assert stored(nca, old.serial_number)[2:] == ("revoked", "superseded")  # type: ignore[index]
    assert stored(nca, new.serial_number)[2:] == ("issued", None)  # type: ignore[index]

    crl_response = lenient_server.get("/crl/ca.crl")
    assert crl_response.status_code == 200
    crl = x509.load_der_x509_crl(crl_response.content)
    assert crl.is_signature_valid(ca_certs[0].public_key())  # type: ignore[arg-type]
    entry = crl.get_revoked_certificate_by_serial_number(old.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.superseded
    assert crl.get_revoked_certificate_by_serial_number(new.serial_number) is None

    # A retry of the same request (lost reply) gets the same certificate, not a refusal
    # because its signer is now revoked.
    again = send(lenient_server, ca_certs, request)
    assert (again.pki_status, again.certificates) == (SUCCESS, [new])
    # Any other renewal with the replaced certificate is refused.
    result, _ = renew(lenient_server, ca_certs, old, old_key)
    assert refusal(result) == (FAILURE, BAD_REQUEST)


def test_renewal_disabled(
    nca: SoftCa, disabled_server: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    """No Renewal cap; RenewalReq refused; a certificate-signed PKCSReq is a plain enrollment."""
    assert "Renewal" not in caps(disabled_server)
    assert {"POSTPKIOperation", "SHA-256", "AES"} <= set(caps(disabled_server))
    old, old_key = enroll(disabled_server, nca, ca_certs, "disabled")
    result, _ = renew(disabled_server, ca_certs, old, old_key)
    assert refusal(result) == (FAILURE, BAD_REQUEST)
    result, _ = renew(disabled_server, ca_certs, old, old_key, message_type=PKCS_REQ)
    assert refusal(result) == (FAILURE, BAD_REQUEST)  # no challenge
    result, _ = renew(
        disabled_server,
        ca_certs,
        old,
        old_key,
        message_type=PKCS_REQ,
        challenge=nca.challenge,
    )
    assert result.pki_status == SUCCESS
    assert result.certificates[0].subject == OTHER_SUBJECT  # the CSR's, as for any enrollment


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("enabled = 3", "renewal.enabled has value 3"),
        ('allow_key_reuse = "maybe"', "renewal.allow_key_reuse has value 'maybe'"),
        ("window_days = -1", "renewal.window_days must be at least 0"),
    ],
)
def test_renewal_settings_are_checked(nca: SoftCa, setting: str, message: str) -> None:
    bad = nca.directory / "bad-renewal.toml"
    bad.write_text(nca.config.read_text() + f"\n[renewal]\n{setting}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(bad)


def test_renewal_settings(nca: SoftCa) -> None:
    config = nca.directory / "renewal.toml"
    config.write_text(nca.config.read_text() + "\n[renewal]\nenabled = false\n")
    settings = load_settings(config)
    assert not settings.renewal.enabled and "Renewal" not in settings.server.caps
    assert load_settings(nca.config).renewal.enabled and "Renewal" in nca.settings.server.caps
    config.write_text(
        nca.config.read_text()
        + "\n[renewal]\nwindow_days = 30\nallow_key_reuse = true\nrevoke_replaced = true\n"
    )
    settings = load_settings(config)
    assert (
        settings.renewal.enabled,
        settings.renewal.window_days,
        settings.renewal.allow_key_reuse,
        settings.renewal.revoke_replaced,
    ) == (True, 30, True, True)
    defaults = nca.settings
    assert (
        defaults.renewal.window_days,
        defaults.renewal.allow_key_reuse,
        defaults.renewal.revoke_replaced,
    ) == (0, True, False)
    assert not defaults.profiles.default.renewal_requires_new_key
    config.write_text(
        nca.config.read_text().replace("[enroll]", "[enroll]\nrenewal_requires_new_key = true", 1)
    )
    assert load_settings(config).profiles.default.renewal_requires_new_key


# ---- the renewal window and expiry: the service on software keys, the store, our clock ----


def test_renewal_window_and_expired_signer(nca: SoftCa, tmp_path: Path) -> None:
    certs = CaCerts.of(nca)
    t0 = datetime.now(UTC).replace(microsecond=0)
    now = [t0]

    async def scenario() -> None:
        store = await CertStore.open(tmp_path / "window.sqlite3")
        try:
            async with soft_pool(nca) as pool:
                service = ScepService(
                    pool=pool,
                    store=store,
                    ca_cert=certs.ca_cert,
                    ra_certs=[certs.ra_sign_cert],
                    chain=[],
                    policy=IssuancePolicy(challenge=None),
                    profiles=Profiles.of(
                        Profile(
                            name="default",
                            caps=(),
                            challenge_mode="static",
                            static_challenge=b"pw",
                            template=replace(DEFAULT_TEMPLATE, validity=timedelta(days=30)),
                        )
                    ),
                    clock=lambda: now[0],
                    renewal=RenewalPolicy(window=timedelta(days=7)),
                )
                ca_certs = client.parse_ca_certs(service.ca_cert_body)

                async def exchange(request: client.ClientRequest) -> client.CertRepResult:
                    return client.open_cert_rep(
                        await service.pki_operation(request.der), request, ca_certs
                    )

                key = rsa.generate_private_key(65537, 2048)
                first = await exchange(
                    client.build_pkcs_req(
                        key=key, ca_certs=ca_certs, challenge="pw", subject=subject("window")
                    )
                )
                [old] = first.certificates
                assert old.not_valid_after_utc == t0 + timedelta(days=30)

                # 23 days before expiry: outside the 7-day window.
                result = await exchange(renewal_request(ca_certs, old, key))
                assert refusal(result) == (FAILURE, BAD_REQUEST)
                now[0] = t0 + timedelta(days=23) - timedelta(seconds=1)
                result = await exchange(renewal_request(ca_certs, old, key, message_type=PKCS_REQ))
                assert refusal(result) == (FAILURE, BAD_REQUEST)

                # Inside the window, by either message type.
                now[0] = t0 + timedelta(days=23)
                for message_type in (RENEWAL_REQ, PKCS_REQ):
                    result = await exchange(
                        renewal_request(ca_certs, old, key, message_type=message_type)
                    )
                    assert result.pki_status == SUCCESS
                    [new] = result.certificates
                    assert new.subject == old.subject and new.serial_number != old.serial_number
                    assert new.not_valid_after_utc == now[0] + timedelta(days=30)
                    assert await store.get_by_serial(new.serial_number) is not None

                # Expired: refused, even inside what would be the window.
                now[0] = t0 + timedelta(days=30, seconds=1)
                for message_type in (RENEWAL_REQ, PKCS_REQ):
                    result = await exchange(
                        renewal_request(ca_certs, old, key, message_type=message_type)
                    )
                    assert refusal(result) == (FAILURE, BAD_REQUEST)
                assert await store.count() == 3
        finally:
            await store.close()

    asyncio.run(scenario())


# ---- the pure policy, with software keys ------------------------------------------------------


def software_ca(cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name.from_rfc4514_string(f"CN={cn}")
    return software_root(key, name, datetime.now(UTC)), key


def issue(
    ca: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    key: rsa.RSAPrivateKey,
    *,
    not_before: datetime,
    eku: x509.ExtendedKeyUsage | None = None,
    aki_from: rsa.RSAPrivateKey | None = None,
) -> x509.Certificate:
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key((aki_from or ca_key).public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject("pure"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=30))
        .add_extension(aki, critical=False)
    )
    if eku is not None:
        builder = builder.add_extension(eku, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def test_names_our_ca_compares_issuer_and_key_id() -> None:
    ca, ca_key = software_ca("pure CA")
    ca_der = ca.subject.public_bytes()
    key_id = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    key = rsa.generate_private_key(65537, 2048)
    ours = issue(ca, ca_key, key, not_before=datetime.now(UTC))
    issuer_der = ours.issuer.public_bytes()
    assert names_our_ca(issuer_der, ours, ca_der, key_id)
    assert names_our_ca(issuer_der, ours, ca_der, None)
    assert not names_our_ca(subject("pure").public_bytes(), ours, ca_der, key_id)
    other_key = rsa.generate_private_key(65537, 2048)
    other_id = issue(ca, ca_key, key, not_before=datetime.now(UTC), aki_from=other_key)
    assert not names_our_ca(issuer_der, other_id, ca_der, key_id)


def test_check_signer_and_renewed_request() -> None:
    ca, ca_key = software_ca("pure CA")
    key = rsa.generate_private_key(65537, 2048)
    now = datetime.now(UTC)
    server_and_client = x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    old = issue(ca, ca_key, key, not_before=now - timedelta(days=1), eku=server_and_client)
    der = old.public_bytes(Encoding.DER)
    policy = RenewalPolicy()
    check_signer(old, StoredSigner(der, revoked=False), ca_cert=ca, now=now, policy=policy)

    def refused(stored: StoredSigner, at: datetime, p: RenewalPolicy = policy) -> str:
        with pytest.raises(Rejected) as caught:
            check_signer(old, stored, ca_cert=ca, now=at, policy=p)
        return str(caught.value.fail_info)

    assert refused(StoredSigner(None, revoked=False), now) == BAD_CERT_ID
    twin = issue(ca, ca_key, key, not_before=now - timedelta(days=1), eku=server_and_client)
    twin_der = twin.public_bytes(Encoding.DER)
    assert refused(StoredSigner(twin_der, revoked=False), now) == BAD_CERT_ID
    assert refused(StoredSigner(der, revoked=True), now) == BAD_REQUEST
    assert refused(StoredSigner(der, revoked=False), now - timedelta(days=2)) == BAD_REQUEST
    assert refused(StoredSigner(der, revoked=False), now + timedelta(days=30)) == BAD_REQUEST
    window = RenewalPolicy(window=timedelta(days=5))
    assert refused(StoredSigner(der, revoked=False), now, window) == BAD_REQUEST
    check_signer(
        old,
        StoredSigner(der, revoked=False),
        ca_cert=ca,
        now=now + timedelta(days=25),
        policy=window,
    )
    other_ca, _ = software_ca("pure CA")  # same name, another key
    with pytest.raises(Rejected) as caught:
        check_signer(
            old, StoredSigner(der, revoked=False), ca_cert=other_ca, now=now, policy=policy
        )
    assert str(caught.value.fail_info) == BAD_CERT_ID

    new_key = rsa.generate_private_key(65537, 2048).public_key()
    asked = CertRequest(OTHER_SUBJECT, new_key, None)
    renewed = renewed_request(old, asked, policy)
    assert renewed.subject == old.subject and renewed.public_key == new_key
    assert renewed.sans is None and renewed.extended_key_usage == server_and_client
    same_key = CertRequest(OTHER_SUBJECT, key.public_key(), None)
    with pytest.raises(Rejected):
        renewed_request(old, same_key, replace(policy, allow_key_reuse=False))
    with pytest.raises(Rejected):
        renewed_request(old, same_key, policy, requires_new_key=True)
    reused = renewed_request(old, same_key, RenewalPolicy())  # the default keeps the key
    assert reused.public_key == key.public_key()


# ---- a real client ------------------------------------------------------------------------------


@pytest.mark.hsm
@pytest.mark.interop
def test_scepclient_renews_with_its_certificate(
    softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """micromdm's scepclient sends a RenewalReq once client.pem exists, with the same key.

    Against real `hsmscep serve` processes on one SoftHSM2 CA: a profile that requires a new
    key on renewal, and LENIENT.
    """
    from tests.test_interop import SCEPCLIENT, enroll_with_scepclient

    if SCEPCLIENT is None:
        pytest.skip("scepclient not installed (apt-get install scep)")
    ca = make_ca(softhsm_dir, tmp_path_factory.mktemp("renewal-real"), "renewal-ca")
    new_key_server = start_server(ca, {"HSMSCEP_ENROLL_RENEWAL_REQUIRES_NEW_KEY": "true"})
    lenient_server = start_server(ca, LENIENT)
    try:
        first = enroll_with_scepclient(lenient_server.url, ca.challenge, tmp_path, "scepclient-r")
        assert first.returncode == 0, first.stdout + first.stderr
        old = x509.load_pem_x509_certificate((tmp_path / "client.pem").read_bytes())
        # It keeps its key: refused where the profile requires a new key, renewed elsewhere.
        refused = enroll_with_scepclient(new_key_server.url, "", tmp_path, "scepclient-r")
        assert refused.returncode != 0
        assert "badRequest" in refused.stdout + refused.stderr
        renewed = enroll_with_scepclient(lenient_server.url, "", tmp_path, "scepclient-r")
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    finally:
        for srv in (new_key_server, lenient_server):
            srv.stop()
            assert "Traceback" not in srv.output()
    new = x509.load_pem_x509_certificate((tmp_path / "client.pem").read_bytes())
    assert new.serial_number != old.serial_number and new.subject == old.subject
    assert stored(ca, old.serial_number)[2:] == ("revoked", "superseded")  # type: ignore[index]
