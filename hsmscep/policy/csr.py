"""A PKCS#10 request as hsmscep reads it: parsed, its self-signature verified (SHA-1 and
Apple's version-2 requests included), its subject checked to be a valid name, and its
challengePassword values. No I/O; the policy that follows lives in hsmscep.policy.issuance.
"""

from __future__ import annotations

from dataclasses import dataclass

from asn1crypto import csr as asn1_csr
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from hsmscep.errors import Rejected
from hsmscep.protocol import asn1
from hsmscep.protocol.algorithms import (
    DIGESTS_BY_NAME,
    ECDSA_SIGNATURE_DIGESTS,
    RSA_SIGNATURE_DIGESTS,
)
from hsmscep.protocol.codes import FailInfo


@dataclass(frozen=True, slots=True)
class CsrParts:
    """What the checks after load_csr read of a CSR, read once: cryptography builds a new key
    or Name object (and escapes the name again) on every access."""

    public_key: CertificatePublicKeyTypes  # the pkiMessage signer's object when it is equal
    subject: x509.Name
    subject_text: str  # RFC 4514


def load_csr(der: bytes, signer_key: object = None) -> x509.CertificateSigningRequest:
    """Parse a PKCS#10 request and verify its self-signature; refuse with badMessageCheck.

    `signer_key`: the pkiMessage signer's public key object, which usually is the CSR's own
    key; verifying with that object skips setting up the same key in OpenSSL a second time.
    """
    return read_csr(der, signer_key)[0]


def read_csr(
    der: bytes, signer_key: object = None
) -> tuple[x509.CertificateSigningRequest, CsrParts]:
    """load_csr, and the parts of the CSR the checks after it read."""
    try:
        csr = x509.load_der_x509_csr(der)
    except x509.InvalidVersion:
        csr = _load_csr_with_bad_version(der)
        return csr, _parts(csr, csr.public_key())
    except ValueError:
        raise Rejected(FailInfo.BAD_MESSAGE_CHECK, "CSR does not parse") from None
    # Verified by hand rather than with is_signature_valid, which refuses SHA-1: old Cisco
    # IOS signs nothing else, and a SHA-1 self-signature only proves possession of the key.
    public_key = csr.public_key()
    if signer_key is not None and public_key == signer_key:
        public_key = signer_key  # type: ignore[assignment]  # equal keys, set up once
    _verify_csr_signature(
        public_key,
        csr.signature_algorithm_oid.dotted_string,
        csr.tbs_certrequest_bytes,
        csr.signature,
    )
    return csr, _parts(csr, public_key)


def _parts(csr: x509.CertificateSigningRequest, public_key: CertificatePublicKeyTypes) -> CsrParts:
    # cryptography parses the subject lazily: an empty RDN or a value of the wrong type would
    # otherwise surface as a ValueError deep in the policy checks.
    try:
        subject = csr.subject
        text = subject.rfc4514_string()
    except (ValueError, KeyError):  # KeyError: cryptography 47, for an unknown string tag
        raise Rejected(
            FailInfo.BAD_REQUEST, "CSR subject is not a valid distinguished name"
        ) from None
    return CsrParts(public_key, subject, text)


def _verify_csr_signature(
    public_key: object, sig_oid: str, signed: bytes, signature: bytes
) -> None:
    try:
        if isinstance(public_key, rsa.RSAPublicKey) and sig_oid in RSA_SIGNATURE_DIGESTS:
            algorithm = DIGESTS_BY_NAME[RSA_SIGNATURE_DIGESTS[sig_oid]].hash()
            public_key.verify(signature, signed, padding.PKCS1v15(), algorithm)
        elif (
            isinstance(public_key, ec.EllipticCurvePublicKey) and sig_oid in ECDSA_SIGNATURE_DIGESTS
        ):
            algorithm = DIGESTS_BY_NAME[ECDSA_SIGNATURE_DIGESTS[sig_oid]].hash()
            public_key.verify(signature, signed, ec.ECDSA(algorithm))
        else:
            raise Rejected(FailInfo.BAD_ALG, f"unsupported CSR signature algorithm {sig_oid}")
    except InvalidSignature:
        raise Rejected(FailInfo.BAD_MESSAGE_CHECK, "CSR signature does not verify") from None


def _load_csr_with_bad_version(der: bytes) -> x509.CertificateSigningRequest:
    # Some Apple devices send version 2 (interop-quirks #12): verify the signature over the
    # request info as sent, then let cryptography parse a copy with the version set to 0.
    try:
        req = asn1_csr.CertificationRequest.load(der, strict=True)
        info = req["certification_request_info"]
        public_key = serialization.load_der_public_key(info["subject_pk_info"].dump())
        signed = info.dump()
        signature = req["signature"].native
        sig_oid = req["signature_algorithm"]["algorithm"].dotted
    except Exception:
        raise Rejected(FailInfo.BAD_MESSAGE_CHECK, "CSR does not parse") from None
    _verify_csr_signature(public_key, sig_oid, signed, signature)
    try:
        fixed = asn1_csr.CertificationRequestInfo.load(signed).copy()
        fixed["version"] = 0
        req_fixed = asn1_csr.CertificationRequest(
            {
                "certification_request_info": fixed,
                "signature_algorithm": req["signature_algorithm"],
                "signature": signature,
            }
        )
        return x509.load_der_x509_csr(req_fixed.dump())
    except Exception:
        raise Rejected(FailInfo.BAD_MESSAGE_CHECK, "CSR does not parse") from None


def challenge_password(csr: x509.CertificateSigningRequest) -> bytes | None:
    """The CSR's challengePassword, for checks outside the CSR policy (one-time challenges,
    webhooks); None when absent. Several values are refused with badRequest."""
    values = challenge_values(csr)
    if len(values) > 1:
        raise Rejected(FailInfo.BAD_REQUEST, "several challengePasswords")
    return values[0] if values else None


def challenge_values(csr: x509.CertificateSigningRequest) -> list[bytes]:
    """Every challengePassword value of the CSR, as raw octets."""
    try:
        attributes = list(csr.attributes)
    except ValueError:  # cryptography refuses multi-valued or empty attribute sets
        raise Rejected(FailInfo.BAD_REQUEST, "CSR attributes are malformed") from None
    # PrintableString and UTF8String both arrive as their raw octets here.
    return [a.value for a in attributes if a.oid.dotted_string == asn1.OID_CHALLENGE_PASSWORD]
