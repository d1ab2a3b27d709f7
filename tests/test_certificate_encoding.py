"""protocol.certificate: sign_certificate's own DER encoding is byte for byte what
cryptography's CertificateBuilder makes from the same inputs, for every part it writes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.policy import crl
from hsmscep.policy.issuance import IssuancePolicy, Issuer, sign_certificate
from hsmscep.policy.request import CertRequest
from hsmscep.policy.template import DEFAULT_TEMPLATE, CertTemplate
from hsmscep.protocol.certificate import validity_time

NOW = datetime(2049, 12, 31, 23, 58, 30, 123456, tzinfo=UTC)  # notAfter falls in 2050


def _ca(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> Issuer:
    name = x509.Name.from_rfc4514_string("CN=Encoding CA,O=Example,C=DE")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2070, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return Issuer.of(cert)


def _by_builder(
    req: CertRequest,
    issuer: Issuer,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    policy: IssuancePolicy,
    t: CertTemplate,
    key_usage: x509.KeyUsage,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(req.subject)
        .issuer_name(issuer.certificate.subject)
        .public_key(req.public_key)
        .serial_number(0x00FF_1234_5678_9ABC_DEF0)
        .not_valid_before(NOW - policy.backdate)
        .not_valid_after(NOW + t.validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(t.extended_key_usage, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(req.public_key), False)
        .add_extension(issuer.authority_key_id, critical=False)
    )
    if req.sans is not None:
        builder = builder.add_extension(req.sans, critical=not len(req.subject))
    assert policy.crl_distribution_points and policy.authority_information_access
    builder = builder.add_extension(policy.crl_distribution_points, critical=False)
    builder = builder.add_extension(policy.authority_information_access, critical=False)
    return builder.sign(key, hashes.SHA384())


@pytest.mark.parametrize("ca_type", ["rsa", "p256"])
@pytest.mark.parametrize("subject", ["CN=device-1,O=Example", ""])
def test_encoded_certificate_matches_the_builder(ca_type: str, subject: str) -> None:
    ca_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(65537, 2048)
        if ca_type == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    issuer = _ca(ca_key)
    urls = crl.PublicUrls.of("https://pki.example.com")
    policy = IssuancePolicy(
        challenge=None,
        crl_distribution_points=urls.crl_distribution_points(),
        authority_information_access=urls.authority_information_access(),
    )
    t = replace(DEFAULT_TEMPLATE, signature_hash="sha384")
    req = CertRequest(
        x509.Name.from_rfc4514_string(subject),
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        x509.SubjectAlternativeName([x509.DNSName("device-1.example.com")]),
    )
    signed = sign_certificate(
        req,
        issuer=issuer,
        issuer_key=ca_key,  # type: ignore[arg-type]  # a software key signs as the HSM's does
        serial=0x00FF_1234_5678_9ABC_DEF0,
        now=NOW,
        policy=policy,
        template=t,
    )
    ours = x509.load_der_x509_certificate(signed.der)
    usage = ours.extensions.get_extension_for_class(x509.KeyUsage).value
    theirs = _by_builder(req, issuer, ca_key, policy, t, usage)
    # ECDSA signatures are randomized: the signed part and the algorithm must be equal.
    assert ours.tbs_certificate_bytes == theirs.tbs_certificate_bytes
    assert ours.signature_algorithm_oid == theirs.signature_algorithm_oid
    if ca_type == "rsa":  # PKCS#1 v1.5 is deterministic: the very same bytes
        assert ours.public_bytes(Encoding.DER) == theirs.public_bytes(Encoding.DER)
    ours.verify_directly_issued_by(issuer.certificate)
    assert ours.not_valid_after_utc.year == 2050  # GeneralizedTime from 2050 on


@pytest.mark.parametrize(
    ("now", "validity"),
    [
        (NOW, timedelta(days=365 * 30)),  # notAfter capped by the CA's, in GeneralizedTime
        (datetime(2030, 6, 1, 12, 0, 0, 999_999, tzinfo=UTC), timedelta(days=30)),
        (
            datetime(2030, 6, 1, 1, 30, 5, 500, tzinfo=timezone(timedelta(hours=5))),
            timedelta(hours=1, microseconds=700_000),
        ),
    ],
    ids=["capped", "fraction", "other-zone"],
)
def test_signed_certificate_reports_the_validity_it_encoded(
    now: datetime, validity: timedelta
) -> None:
    """The store records sign_certificate's dates without parsing the certificate back: they
    must be the very instants the DER holds."""
    ca_key = rsa.generate_private_key(65537, 2048)
    issuer = _ca(ca_key)
    req = CertRequest(
        x509.Name.from_rfc4514_string("CN=dates"), ca_key.public_key(), None, validity=validity
    )
    signed = sign_certificate(
        req,
        issuer=issuer,
        issuer_key=ca_key,  # type: ignore[arg-type]  # a software key signs as the HSM's does
        serial=12345,
        now=now,
        policy=IssuancePolicy(challenge=None),
    )
    parsed = x509.load_der_x509_certificate(signed.der)
    assert (signed.not_before, signed.not_after) == (
        parsed.not_valid_before_utc,
        parsed.not_valid_after_utc,
    )
    assert parsed.serial_number == 12345
    if validity > timedelta(days=365):
        assert signed.not_after == issuer.certificate.not_valid_after_utc


def test_validity_time_switches_to_generalized_time_in_2050() -> None:
    assert validity_time(datetime(2049, 12, 31, 23, 59, 59, 999, tzinfo=UTC)) == (
        b"\x17\x0d491231235959Z"
    )
    assert validity_time(datetime(2050, 1, 1, tzinfo=UTC)) == b"\x18\x0f20500101000000Z"
    # Another zone is written as the same instant in UTC.
    plus_two = datetime(2030, 6, 1, 2, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    assert validity_time(plus_two) == b"\x17\x0d300601020000Z"


def test_the_builders_refusals_are_kept() -> None:
    # An expired CA bounds notAfter before notBefore: refused, never an inverted validity.
    ca_key = rsa.generate_private_key(65537, 2048)
    issuer = _ca(ca_key)
    req = CertRequest(x509.Name.from_rfc4514_string("CN=late"), ca_key.public_key(), None)

    def build(serial: int, now: datetime) -> x509.Certificate:
        signed = sign_certificate(
            req,
            issuer=issuer,
            issuer_key=ca_key,  # type: ignore[arg-type]
            serial=serial,
            now=now,
            policy=IssuancePolicy(challenge=None),
        )
        return x509.load_der_x509_certificate(signed.der)

    with pytest.raises(ValueError, match="not valid after"):
        build(1, datetime(2071, 1, 1, tzinfo=UTC))  # after the CA's notAfter (2070)
    for serial in (0, -5, 1 << 159):
        with pytest.raises(ValueError, match="serial"):
            build(serial, NOW)
    assert build((1 << 159) - 1, NOW).serial_number == (1 << 159) - 1
    # A naive time is UTC, as cryptography's builder takes it.
    assert validity_time(datetime(2030, 6, 1)) == b"\x17\x0d300601000000Z"
