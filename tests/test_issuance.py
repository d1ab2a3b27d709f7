"""policy.issuance.check_csr on CSRs that cryptography's builder will not make, built with
asn1crypto and signed with a software key."""

from __future__ import annotations

import pytest
from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hsmscep.errors import Rejected
from hsmscep.policy.issuance import IssuancePolicy, check_csr
from hsmscep.protocol.codes import FailInfo

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _csr(subject: asn1_x509.Name, extensions: list[asn1_x509.Extension]) -> bytes:
    spki = asn1_keys.PublicKeyInfo.load(
        KEY.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    attributes = []
    if extensions:
        attributes.append(
            {"type": "extension_request", "values": [asn1_x509.Extensions(extensions)]}
        )
    info = asn1_csr.CertificationRequestInfo(
        {"version": "v1", "subject": subject, "subject_pk_info": spki, "attributes": attributes}
    )
    signature = KEY.sign(info.dump(), padding.PKCS1v15(), hashes.SHA256())
    return asn1_csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": "sha256_rsa"},
            "signature": signature,
        }
    ).dump()


def _empty_san(critical: bool) -> asn1_x509.Extension:
    return asn1_x509.Extension(
        {"extn_id": "subject_alt_name", "critical": critical, "extn_value": []}
    )


def _refusal(der: bytes) -> str:
    with pytest.raises(Rejected) as caught:
        check_csr(x509.load_der_x509_csr(der), IssuancePolicy(challenge=None))
    assert caught.value.fail_info == FailInfo.BAD_REQUEST
    return caught.value.reason


def _load_or_refuse(der: bytes) -> str:
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError:
        return "cryptography refuses to load it"  # newer releases: also a refusal
    with pytest.raises(Rejected) as caught:
        check_csr(csr, IssuancePolicy(challenge=None))
    assert caught.value.fail_info == FailInfo.BAD_REQUEST
    return caught.value.reason


@pytest.mark.parametrize("critical", [False, True])
def test_empty_subject_with_empty_san_extension_is_refused(critical: bool) -> None:
    der = _csr(asn1_x509.Name.build({}), [_empty_san(critical)])
    reason = _load_or_refuse(der)
    assert reason in (
        "empty subjectAltName extension",
        "CSR extension request is malformed",
        "cryptography refuses to load it",
    )


def test_subject_with_empty_san_extension_is_refused() -> None:
    der = _csr(asn1_x509.Name.build({"common_name": "device"}), [_empty_san(False)])
    assert _load_or_refuse(der) in (
        "empty subjectAltName extension",
        "CSR extension request is malformed",
        "cryptography refuses to load it",
    )


def test_empty_subject_without_san_is_refused() -> None:
    der = _csr(asn1_x509.Name.build({}), [])
    assert _refusal(der) == "empty subject and no subject alternative name"


def test_empty_subject_with_a_san_is_accepted() -> None:
    san = asn1_x509.Extension(
        {
            "extn_id": "subject_alt_name",
            "critical": True,
            "extn_value": [asn1_x509.GeneralName("dns_name", "device.example.com")],
        }
    )
    request = check_csr(
        x509.load_der_x509_csr(_csr(asn1_x509.Name.build({}), [san])),
        IssuancePolicy(challenge=None),
    )
    assert request.sans is not None and len(request.sans) == 1
    assert len(request.subject) == 0
