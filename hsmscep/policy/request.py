"""A certificate request that passed the policy: what the certificate will be issued for.

Produced by issuance.check_csr, narrowed by a template, overridden by a webhook or a renewal.
No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa


@dataclass(frozen=True, slots=True)
class CertRequest:
    """A CSR whose signature, key, challenge and extensions passed the policy."""

    subject: x509.Name
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    sans: x509.SubjectAlternativeName | None
    # None: the template's; a renewal keeps the EKU of the certificate it replaces.
    extended_key_usage: x509.ExtendedKeyUsage | None = None
    # None: the template's; set by an authorization webhook (template.with_overrides).
    validity: timedelta | None = None
    # The CSR subject's RFC 4514 string as the CSR check made it, for as long as `subject` is
    # that very Name (a rewrite or a renewal replaces it): escaping a name again costs ~30 us.
    subject_rfc4514: tuple[x509.Name, str] | None = None

    def subject_text(self) -> str:
        """The subject as an RFC 4514 string."""
        known = self.subject_rfc4514
        if known is not None and known[0] is self.subject:
            return known[1]
        return self.subject.rfc4514_string()
