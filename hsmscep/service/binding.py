"""Key binding of an initial enrollment (RFC 8894 §2.3): who signed the request holds the CSR's key.

A PKCSReq not authenticated by a certificate this CA issued (renewal) is signed with a
throwaway self-signed certificate carrying the key being certified. Requiring that key to be
the CSR's is what stops an envelope lifted from another device's request, re-signed by a
third party, from burning that device's one-time challenge or getting its certificate.
The signer's subject may differ from the CSR's (Cisco ASA, interop-quirks #13).

A CSR key that cannot decrypt the reply (EC) comes with a separate RSA signer key, as the
reply is encrypted to the signer: there only the self-signature is required, so such an
envelope could still be re-signed by a third party (docs/protocol.md, key binding).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from hsmscep.service.refusal import Refusal


def check_key_binding(
    signer: x509.Certificate,
    signer_key: CertificatePublicKeyTypes,
    csr_key: CertificatePublicKeyTypes,
    ca_cert: x509.Certificate,
    names_der: tuple[bytes, bytes] | None = None,
) -> None:
    """Refuse (badMessageCheck) unless `signer` is self-signed and carries the CSR's key
    (any RSA key when the CSR's key is not RSA), or was issued by `ca_cert` (with renewal
    disabled, such a request is a plain enrollment authenticated by that certificate).
    `signer_key`: the signer certificate's public key, as the request's decoder loaded it;
    `csr_key`: the CSR's, as read_csr loaded it; `names_der`: the signer's issuer and subject
    as encoded (PkiRequest), which spares two Name objects when they are the same bytes."""
    if _issued_by(signer, ca_cert):
        return
    # Key objects compare their public numbers: the same test as comparing the SPKI DER.
    bound = isinstance(csr_key, rsa.RSAPublicKey)
    if bound and signer_key != csr_key:
        raise Refusal.SIGNER_KEY_MISMATCH()
    try:
        if names_der is not None and names_der[0] == names_der[1]:
            # Same encoding, same name. The subject is still read (19 us against 43 for both
            # names and the comparison, hot), so a name cryptography cannot read is refused.
            signer.subject  # noqa: B018
        elif signer.issuer != signer.subject:
            raise Refusal.SIGNER_NOT_SELF_SIGNED()
        if bound:
            # The self-signature would only prove possession of the signer's key, which the
            # pkiMessage signature (verified with this key on decode, protocol.message) and
            # the CSR's own signature already prove; the certificate is a throwaway carrier
            # of the CSR's key. One RSA verification less per enrollment (bench/PROFILE.md).
            # Kept where the signer's key is not the CSR's (an EC CSR's RSA signer).
            return
        signer.verify_directly_issued_by(signer)
    except (InvalidSignature, ValueError, KeyError):
        # KeyError: cryptography 47 reports a name with an unknown string tag this way (later
        # releases raise ValueError); either way the signer is not a usable self-signed one.
        raise Refusal.SIGNER_NOT_SELF_SIGNED() from None
    except (UnsupportedAlgorithm, TypeError):
        # An old digest the library will not verify (MD5 from old IOS): the request's own
        # signature, checked with this very key, already proves possession of it.
        pass


def _issued_by(signer: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    # A name is no proof: a forged certificate could carry ours as its issuer.
    try:
        signer.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True
