"""Issuance policy: check a decrypted CSR and build the certificate (RFC 5280). No I/O.

`check_csr` holds every request to the baseline; a profile's template (hsmscep.policy.template)
narrows it further and decides validity, key usages, EKU and signature hash. The CA key is a
parameter: on the server it is an HSM-backed key object and `sign()` runs on a signing
worker thread.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID

from hsmscep.errors import Rejected
from hsmscep.policy.csr import CsrParts, challenge_values
from hsmscep.policy.names import describe_name
from hsmscep.policy.request import CertRequest
from hsmscep.policy.template import (
    DEFAULT_TEMPLATE,
    MAX_SANS,
    MAX_SUBJECT_BYTES,
    CertTemplate,
)
from hsmscep.protocol import asn1
from hsmscep.protocol.certificate import (
    constant_extension,
    encode_certificate,
    encoded_instant,
    extension,
)
from hsmscep.protocol.codes import FailInfo
from hsmscep.protocol.keys import SigningKey

_CURVES = {"secp256r1": 256, "secp384r1": 384}
# C0 controls and DEL; one regex search instead of a Python loop over every character.
_CONTROL = re.compile("[\x00-\x1f\x7f]")
# Extensions a CSR may ask for that we either copy (SAN) or knowingly replace with our own.
_KNOWN_EXTENSIONS = {
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    x509.ObjectIdentifier(asn1.OID_MS_CERT_TEMPLATE_NAME),
}


@dataclass(frozen=True, slots=True)
class IssuancePolicy:
    """The baseline every request must satisfy, and what every certificate carries.

    Validity, key usages, EKU and signature hash are the template's (CertTemplate).
    """

    challenge: bytes | None  # None: no challenge required (only when configured so)
    backdate: timedelta = timedelta(minutes=5)
    min_rsa_bits: int = 2048  # no template goes below
    # Where relying parties find the CRL and the CA certificate; only with a public base URL.
    crl_distribution_points: x509.CRLDistributionPoints | None = None
    authority_information_access: x509.AuthorityInformationAccess | None = None


@dataclass(frozen=True, slots=True)
class Issuer:
    """The CA certificate's parts every issued certificate needs, computed once."""

    certificate: x509.Certificate
    authority_key_id: x509.AuthorityKeyIdentifier
    subject_der: bytes = b""  # the issuer name of every certificate, encoded once

    @classmethod
    def of(cls, certificate: x509.Certificate) -> Issuer:
        try:
            ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
                certificate.public_key()  # type: ignore[arg-type]
            )
        return cls(certificate, aki, certificate.subject.public_bytes())


def check_csr(
    csr: x509.CertificateSigningRequest, policy: IssuancePolicy, parts: CsrParts | None = None
) -> CertRequest:
    """Apply the policy to a verified CSR; raise Rejected with the fitting failInfo.
    `parts`: what read_csr already read of it."""
    _check_challenge(csr, policy.challenge)
    public_key = parts.public_key if parts is not None else csr.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < policy.min_rsa_bits:
            raise Rejected(
                FailInfo.BAD_REQUEST,
                f"RSA key of {public_key.key_size} bits; at least {policy.min_rsa_bits} required",
            )
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in _CURVES:
            raise Rejected(FailInfo.BAD_REQUEST, f"curve {public_key.curve.name} not allowed")
    else:
        raise Rejected(FailInfo.BAD_REQUEST, "only RSA and EC P-256/P-384 keys are accepted")

    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise Rejected(FailInfo.BAD_REQUEST, "CSR extension request is malformed") from None
    sans: x509.SubjectAlternativeName | None = None
    for ext in extensions:
        if ext.oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
            sans = ext.value
        elif ext.oid == ExtensionOID.BASIC_CONSTRAINTS and ext.value.ca:
            raise Rejected(FailInfo.BAD_REQUEST, "CA certificates are not issued over SCEP")
        elif ext.critical and ext.oid not in _KNOWN_EXTENSIONS:
            raise Rejected(
                FailInfo.BAD_REQUEST, f"unknown critical extension {ext.oid.dotted_string}"
            )
    if sans is not None and len(sans) == 0:
        # RFC 5280 §4.2.1.6: the extension holds at least one name. Some cryptography releases
        # parse an empty one (and 47 even signs it, critical); the policy never relies on that.
        raise Rejected(FailInfo.BAD_REQUEST, "empty subjectAltName extension")
    if sans is not None and len(sans) > MAX_SANS:
        raise Rejected(FailInfo.BAD_REQUEST, f"more than {MAX_SANS} subject alternative names")

    subject = parts.subject if parts is not None else csr.subject
    if len(subject.public_bytes()) > MAX_SUBJECT_BYTES:
        raise Rejected(FailInfo.BAD_REQUEST, "subject too long")
    for rdn_attr in subject:
        value = rdn_attr.value
        if isinstance(value, str) and _CONTROL.search(value):
            raise Rejected(FailInfo.BAD_REQUEST, "control characters in the subject")
    if not len(subject) and sans is None:
        raise Rejected(FailInfo.BAD_REQUEST, "empty subject and no subject alternative name")
    known = (subject, parts.subject_text) if parts is not None else None
    return CertRequest(subject, public_key, sans, subject_rfc4514=known)


def _check_challenge(csr: x509.CertificateSigningRequest, expected: bytes | None) -> None:
    values = challenge_values(csr)
    if expected is None:
        return
    if len(values) != 1:
        reason = "challengePassword missing" if not values else "several challengePasswords"
        raise Rejected(FailInfo.BAD_REQUEST, reason)
    if not hmac.compare_digest(values[0], expected):
        raise Rejected(FailInfo.BAD_REQUEST, "challengePassword does not match")


@dataclass(frozen=True, slots=True)
class SignedCertificate:
    """A certificate as signed, with the fields the store records, as they are encoded
    (UTC, whole seconds): no need to parse the certificate back to read them."""

    der: bytes
    not_before: datetime
    not_after: datetime


def sign_certificate(
    request: CertRequest,
    *,
    issuer: Issuer,
    issuer_key: SigningKey,
    serial: int,
    now: datetime,
    policy: IssuancePolicy,
    template: CertTemplate = DEFAULT_TEMPLATE,
) -> SignedCertificate:
    """Build and sign an end-entity certificate for a checked request, as the template says.

    The request's EKU (a renewal's) and validity (a webhook's) win over the template's; the
    CA's notAfter bounds the validity.
    """
    validity = request.validity if request.validity is not None else template.validity
    not_after = min(now + validity, issuer.certificate.not_valid_after_utc)
    not_before = now - policy.backdate
    if template.key_usage is not None:
        key_usage = template.key_usage
    elif isinstance(request.public_key, rsa.RSAPublicKey):
        key_usage = _KU_RSA
    else:
        key_usage = _KU_EC
    # What cryptography's CertificateBuilder would write, in its order, from encoded parts:
    # the template's and policy's extensions are encoded once per CA (protocol.certificate).
    extensions = [
        constant_extension(_BASIC_CONSTRAINTS, True),
        constant_extension(key_usage, True),
        constant_extension(request.extended_key_usage or template.extended_key_usage, False),
        extension(x509.SubjectKeyIdentifier.from_public_key(request.public_key), False),
        constant_extension(issuer.authority_key_id, False),
    ]
    if request.sans is not None:
        # RFC 5280 §4.2.1.6: the SAN is critical when the subject is empty.
        extensions.append(extension(request.sans, not len(request.subject)))
    if policy.crl_distribution_points is not None:
        extensions.append(constant_extension(policy.crl_distribution_points, False))
    if policy.authority_information_access is not None:
        extensions.append(constant_extension(policy.authority_information_access, False))
    der = encode_certificate(
        serial=serial,
        issuer_der=issuer.subject_der or issuer.certificate.subject.public_bytes(),
        not_before=not_before,
        not_after=not_after,
        subject_der=request.subject.public_bytes(),
        spki_der=request.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        extensions=extensions,
        key=issuer_key,
        hash_algorithm=_CERT_HASHES[template.signature_hash](),
    )
    return SignedCertificate(der, encoded_instant(not_before), encoded_instant(not_after))


def describe_sans(sans: x509.SubjectAlternativeName | None) -> tuple[str, ...]:
    """SANs as 'TYPE:value' strings for the store and logs."""
    if sans is None:
        return ()
    return tuple(describe_name(name) for name in sans)


_CERT_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_BASIC_CONSTRAINTS = x509.BasicConstraints(ca=False, path_length=None)
_KU_RSA = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_KU_EC = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
