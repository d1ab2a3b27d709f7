"""service.binding on its own: the key binding of an initial enrollment, without HTTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from hsmscep.errors import Rejected
from hsmscep.protocol.message import decode_pki_message
from hsmscep.service.binding import check_key_binding
from hsmscep.testing.requests import build_pkcs_req, self_signed_signer


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(65537, 2048) for _ in range(3)]


def _name(cn: str, kind: x509.name._ASN1Type = x509.name._ASN1Type.UTF8String) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, _type=kind)])


def _cert(
    subject: x509.Name, issuer: x509.Name, key: rsa.RSAPrivateKey, signer: rsa.RSAPrivateKey
) -> x509.Certificate:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(signer, hashes.SHA256())
    )


def test_binding(keys: list[rsa.RSAPrivateKey]) -> None:
    """The signer carries the CSR's key and names itself as issuer: bound. Another key, or
    another issuer name, is refused with badMessageCheck."""
    ca_cert = self_signed_signer(keys[2], _name("CA"))
    signer = self_signed_signer(keys[0], _name("device"))
    check_key_binding(signer, signer.public_key(), keys[0].public_key(), ca_cert)
    with pytest.raises(Rejected, match="not signed with the CSR's key"):
        check_key_binding(signer, signer.public_key(), keys[1].public_key(), ca_cert)
    foreign = _cert(_name("device"), _name("other CA"), keys[0], keys[1])
    with pytest.raises(Rejected, match="must be self-signed"):
        check_key_binding(foreign, foreign.public_key(), keys[0].public_key(), ca_cert)


def test_names_equal_in_other_encodings_are_self_issued(keys: list[rsa.RSAPrivateKey]) -> None:
    """Issuer and subject are compared as names, not as encodings."""
    ca_cert = self_signed_signer(keys[2], _name("CA"))
    signer = _cert(
        _name("device"), _name("device", x509.name._ASN1Type.PrintableString), keys[0], keys[0]
    )
    check_key_binding(signer, signer.public_key(), keys[0].public_key(), ca_cert)


def test_an_ec_csr_keeps_the_self_signature_check(keys: list[rsa.RSAPrivateKey]) -> None:
    """An EC CSR's separate RSA signer is bound by nothing but its self-signature: a signer
    certificate that another key signed is refused."""
    ca_cert = self_signed_signer(keys[2], _name("CA"))
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    good = self_signed_signer(keys[0], _name("device"))
    check_key_binding(good, good.public_key(), ec_key, ca_cert)
    forged = _cert(_name("device"), _name("device"), keys[0], keys[1])
    with pytest.raises(Rejected, match="must be self-signed"):
        check_key_binding(forged, forged.public_key(), ec_key, ca_cert)


def test_names_as_encoded(keys: list[rsa.RSAPrivateKey]) -> None:
    """The decoder's issuer and subject DER: the same bytes need no Name comparison, other
    bytes fall back to it."""
    ca_cert = self_signed_signer(keys[2], _name("CA"))
    recipient = self_signed_signer(keys[1], _name("RA"))
    signer = self_signed_signer(keys[0], _name("device"))
    request = decode_pki_message(
        build_pkcs_req(
            key=keys[0], ca_certs=[ca_cert, recipient], challenge="x", subject=_name("device")
        ).der
    )
    assert request.signer_issuer_der == request.signer_subject_der
    assert request.signer_subject_der == request.signer_cert.subject.public_bytes()
    names = (request.signer_issuer_der, request.signer_subject_der)
    check_key_binding(signer, signer.public_key(), keys[0].public_key(), ca_cert, names)
    mixed = _cert(
        _name("device"), _name("device", x509.name._ASN1Type.PrintableString), keys[0], keys[0]
    )
    differ = (mixed.issuer.public_bytes(), mixed.subject.public_bytes())
    check_key_binding(mixed, mixed.public_key(), keys[0].public_key(), ca_cert, differ)
    foreign = _cert(_name("device"), _name("other CA"), keys[0], keys[1])
    differ = (foreign.issuer.public_bytes(), foreign.subject.public_bytes())
    with pytest.raises(Rejected, match="must be self-signed"):
        check_key_binding(foreign, foreign.public_key(), keys[0].public_key(), ca_cert, differ)
