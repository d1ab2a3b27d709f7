"""Renewal policy: who may renew, when, and what the new certificate keeps. No I/O.

A renewal is a RenewalReq (17) or a PKCSReq signed by a certificate this CA issued (how Cisco,
sscep, jscep and macOS renew; interop-quirks #11). The signer certificate authenticates the
request instead of the challenge: it must be the very certificate we stored under its serial,
verify against our CA, be within its validity and not be revoked. The new certificate keeps
the old certificate's subject, SANs and EKU; the CSR only contributes the public key (its
subject and SANs are ignored, its challenge is not checked).

Fail infos: a signer whose issuer is ours but that we did not store (unknown serial, other
DER, bad signature) gets badCertId; a revoked, expired or not yet valid signer, a request
outside the renewal window, a reused key when that is refused, a RenewalReq whose signer we
did not issue, or a RenewalReq while renewal is disabled get badRequest. badTime is left to
its RFC 8894 meaning (signingTime too far from our clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmscep.errors import Rejected
from hsmscep.policy.request import CertRequest
from hsmscep.protocol.codes import FailInfo

_E = TypeVar("_E", bound=x509.ExtensionType)


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    """[renewal] settings. window 0 means any time before the old certificate expires."""

    enabled: bool = True
    window: timedelta = timedelta(0)
    # Same-key renewal is what micromdm's scepclient, `getcert resubmit` and Cisco IOS
    # without regenerate send; a profile may still require a new key.
    allow_key_reuse: bool = True
    revoke_replaced: bool = False


DEFAULT_RENEWAL = RenewalPolicy()


@dataclass(frozen=True, slots=True)
class StoredSigner:
    """What the store knows about the certificate that signed a renewal request."""

    der: bytes | None  # None: no certificate with that serial was issued here
    revoked: bool
    retried: bool = False  # this transaction already renewed it (its revocation is ours)


def renewal_transaction_id(transaction_id: str, old_serial: int) -> str:
    """The store key of a renewal's certificate.

    Clients that derive the transactionID from the public key (sscep, micromdm's scepclient)
    send a key-reusing renewal under the transactionID of the original enrollment; keyed by
    the certificate it renews, the renewal neither collides with that enrollment nor with a
    later renewal, and a retried renewal still finds its certificate.
    """
    return f"{transaction_id} renews {old_serial:x}"


def names_our_ca(
    signer_issuer_der: bytes,
    signer_cert: x509.Certificate,
    ca_subject_der: bytes,
    ca_key_id: bytes | None,
) -> bool:
    """Cheap pre-check, before any store read: does the signer claim to be issued by us?

    Compares the issuer name as encoded in the certificate (we encode it the same way in every
    certificate we issue) and, when both are present, the authority key identifier.
    """
    if signer_issuer_der != ca_subject_der:
        return False
    if ca_key_id is None:
        return True
    try:
        aki = signer_cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except x509.ExtensionNotFound:
        return True
    except ValueError:
        return False
    return aki.value.key_identifier in (None, ca_key_id)


def check_signer(
    signer_cert: x509.Certificate,
    stored: StoredSigner,
    *,
    ca_cert: x509.Certificate,
    now: datetime,
    policy: RenewalPolicy,
) -> None:
    """Authenticate the old certificate for a renewal; raise Rejected if it does not qualify."""
    signer_der = signer_cert.public_bytes(Encoding.DER)
    if stored.der is None or stored.der != signer_der:
        raise Rejected(FailInfo.BAD_CERT_ID, "signer certificate was not issued here")
    try:
        signer_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise Rejected(FailInfo.BAD_CERT_ID, "signer certificate does not verify") from None
    if stored.revoked and not stored.retried:
        raise Rejected(FailInfo.BAD_REQUEST, "signer certificate is revoked")
    not_after = signer_cert.not_valid_after_utc
    if now > not_after:
        raise Rejected(FailInfo.BAD_REQUEST, "signer certificate has expired")
    if now < signer_cert.not_valid_before_utc:
        raise Rejected(FailInfo.BAD_REQUEST, "signer certificate is not yet valid")
    if policy.window and now < not_after - policy.window and not stored.retried:
        days = policy.window / timedelta(days=1)
        raise Rejected(
            FailInfo.BAD_REQUEST, f"renewal only within {days:g} days of expiry ({not_after})"
        )


def renewed_request(
    old: x509.Certificate,
    request: CertRequest,
    policy: RenewalPolicy,
    *,
    requires_new_key: bool = False,
) -> CertRequest:
    """The request for the new certificate: the CSR's key, the old subject, SANs and EKU.

    `requires_new_key`: the profile's renewal_requires_new_key, on top of the policy."""
    reuse_allowed = policy.allow_key_reuse and not requires_new_key
    if not reuse_allowed and _spki(old.public_key()) == _spki(request.public_key):
        raise Rejected(
            FailInfo.BAD_REQUEST, "renewal must use a new key: the CSR carries the old key"
        )
    extensions = old.extensions
    sans = _extension(extensions, x509.SubjectAlternativeName)
    eku = _extension(extensions, x509.ExtendedKeyUsage)
    return CertRequest(old.subject, request.public_key, sans, eku)


def _extension(extensions: x509.Extensions, kind: type[_E]) -> _E | None:
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
