"""policy.crl.build_crl with a software CA key behind ExternalRsaKey/ExternalEcKey.

The CRL is read back by cryptography, by asn1crypto, and by `openssl crl -verify` where openssl
is installed: signature, issuer, CRL number, authority key id, dates, entries and reasons.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest
from asn1crypto import crl as asn1_crl
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hsmscep.errors import MessageError
from hsmscep.policy.crl import REASONS, RevokedEntry, build_crl, parse_reason, refresh_due
from hsmscep.policy.issuance import Issuer
from hsmscep.protocol.keys import SigningKey
from tests.conftest import software_root
from tests.test_keys import software_ec, software_rsa

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsmscep tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, "CRL Test CA"),
    ]
)
ENTRIES = [
    RevokedEntry(0x1234, NOW - timedelta(days=3), x509.ReasonFlags.key_compromise),
    RevokedEntry(2**150 + 7, NOW - timedelta(hours=5), x509.ReasonFlags.superseded),
    RevokedEntry(9, NOW - timedelta(minutes=1), x509.ReasonFlags.unspecified),
    RevokedEntry(10, NOW - timedelta(days=400), x509.ReasonFlags.certificate_hold),
]


@cache
def rsa_ca() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, software_root(key, NAME, NOW)


@cache
def ec_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())  # no SubjectKeyIdentifier: the AKI comes from the key
    )
    return key, cert


def external(kind: str) -> tuple[SigningKey, x509.Certificate]:
    """The CA's key as the server holds it: only a raw operation, here in software."""
    if kind == "rsa":
        soft_rsa, cert = rsa_ca()
        return software_rsa(soft_rsa, decrypt=False), cert
    soft_ec, cert = ec_ca()
    return software_ec(soft_ec), cert


def crl_for(kind: str, revoked: list[RevokedEntry], number: int) -> x509.CertificateRevocationList:
    key, cert = external(kind)
    return build_crl(
        issuer=Issuer.of(cert),
        issuer_key=key,
        number=number,
        revoked=revoked,
        this_update=NOW,
        next_update=NOW + timedelta(days=7),
    )


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_crl_signature_issuer_number_and_dates(kind: str) -> None:
    _, cert = external(kind)
    crl = crl_for(kind, ENTRIES, number=42)
    assert crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
    assert crl.signature_hash_algorithm is not None
    assert crl.signature_hash_algorithm.name == "sha256"
    assert crl.issuer == cert.subject
    assert crl.last_update_utc == NOW
    assert crl.next_update_utc == NOW + timedelta(days=7)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber)
    assert number.value.crl_number == 42 and not number.critical
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == Issuer.of(cert).authority_key_id.key_identifier
    assert (
        aki.key_identifier
        == x509.SubjectKeyIdentifier.from_public_key(
            cert.public_key()  # type: ignore[arg-type]
        ).digest
    )


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_crl_entries_and_reasons(kind: str) -> None:
    crl = crl_for(kind, ENTRIES, number=3)
    assert len(crl) == len(ENTRIES)
    for entry in ENTRIES:
        revoked = crl.get_revoked_certificate_by_serial_number(entry.serial)
        assert revoked is not None, hex(entry.serial)
        assert revoked.revocation_date_utc == entry.revoked_at
        reasons = [e for e in revoked.extensions if isinstance(e.value, x509.CRLReason)]
        if entry.reason == x509.ReasonFlags.unspecified:
            # RFC 5280 §5.3.1: reasonCode SHOULD be absent rather than unspecified.
            assert reasons == []
        else:
            assert [e.value.reason for e in reasons] == [entry.reason]
            assert not reasons[0].critical


def test_crl_read_by_asn1crypto() -> None:
    crl = crl_for("rsa", ENTRIES, number=2**64 + 1)
    parsed = asn1_crl.CertificateList.load(crl.public_bytes(Encoding.DER))
    assert parsed.crl_number_value.native == 2**64 + 1
    assert parsed["tbs_cert_list"]["version"].native == "v2"
    entries = {
        e["user_certificate"].native: e for e in parsed["tbs_cert_list"]["revoked_certificates"]
    }
    assert set(entries) == {e.serial for e in ENTRIES}
    for entry in ENTRIES:
        got = entries[entry.serial]
        assert got["revocation_date"].native == entry.revoked_at
        reason = got.crl_reason_value
        if entry.reason == x509.ReasonFlags.unspecified:
            assert reason is None
        else:
            assert reason is not None and reason.native == entry.reason.name
    assert parsed["signature_algorithm"]["algorithm"].native == "sha256_rsa"


def test_empty_crl_has_no_revoked_certificates() -> None:
    crl = crl_for("rsa", [], number=1)
    assert len(crl) == 0
    parsed = asn1_crl.CertificateList.load(crl.public_bytes(Encoding.DER))
    # An empty revokedCertificates SEQUENCE is not allowed (RFC 5280 §5.1.2.6): it is omitted.
    assert not parsed["tbs_cert_list"]["revoked_certificates"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_openssl_verifies_the_crl(kind: str, tmp_path: Path) -> None:
    _, cert = external(kind)
    crl_path, ca_path = tmp_path / "ca.crl", tmp_path / "ca.pem"
    crl_path.write_bytes(crl_for(kind, ENTRIES, number=5).public_bytes(Encoding.DER))
    ca_path.write_bytes(cert.public_bytes(Encoding.PEM))
    done = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", crl_path, "-CAfile", ca_path, "-noout",
         "-text"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "verify OK" in done.stderr + done.stdout
    assert re.search(r"X509v3 CRL Number:\s+5\n", done.stdout), done.stdout
    assert "Key Compromise" in done.stdout and "Certificate Hold" in done.stdout


def test_reasons_and_refresh() -> None:
    # removeFromCRL belongs to delta CRLs, which we do not issue.
    assert "removeFromCRL" not in REASONS
    assert parse_reason("keyCompromise") == x509.ReasonFlags.key_compromise
    with pytest.raises(MessageError, match="unknown revocation reason"):
        parse_reason("removeFromCRL")
    week = timedelta(days=7)
    assert not refresh_due(NOW, NOW + week, NOW + week / 2 - timedelta(seconds=1))
    assert refresh_due(NOW, NOW + week, NOW + week / 2)
