"""Revocation reasons, the CA's CRL (RFC 5280 §5) and the URLs issued certificates point to.

No I/O. The CA key is a parameter: on the server an HSM-backed key object whose `sign()` runs
on a signing worker thread, like certificate issuance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import AuthorityInformationAccessOID

from hsmscep.errors import MessageError
from hsmscep.policy.issuance import Issuer
from hsmscep.protocol.keys import SigningKey

CRL_PATH = "/crl/ca.crl"
CA_CERT_PATH = "/ca.crt"

# removeFromCRL only has a meaning in delta CRLs, which we do not issue.
REASONS: dict[str, x509.ReasonFlags] = {
    flag.value: flag for flag in x509.ReasonFlags if flag != x509.ReasonFlags.remove_from_crl
}


def parse_reason(name: str) -> x509.ReasonFlags:
    """An RFC 5280 reason by its ASN.1 name (keyCompromise, superseded, ...); MessageError
    naming the known ones otherwise."""
    try:
        return REASONS[name]
    except KeyError:
        raise MessageError(
            f"unknown revocation reason {name!r}; one of {', '.join(REASONS)}"
        ) from None


def parse_serial(text: str) -> int | None:
    """A serial as tools print it: plain, 0x-prefixed or colon-separated hex; None if not."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned or len(cleaned) > 42 or any(c not in "0123456789abcdef" for c in cleaned):
        return None
    serial = int(cleaned, 16)
    return serial if serial > 0 else None


def openssl_serial(serial: int) -> str:
    """A serial as `openssl x509 -serial` prints it: every byte, zero-padded upper-case hex,
    so an audit line can be grepped for what operators copy from openssl ("0A1B")."""
    return f"{serial:0{2 * max(1, (serial.bit_length() + 7) // 8)}X}"


def revocation_record(
    serial: int, reason: str, revoked_at: datetime, changed: bool, actor: str
) -> dict[str, str]:
    """The audit entry for a revocation, from the CLI or the admin API alike."""
    return {
        "event": "revoke",
        "serial": openssl_serial(serial),
        "reason": reason,
        "revoked_at": revoked_at.isoformat(timespec="seconds"),
        "outcome": "revoked" if changed else "already revoked",
        "by": actor,
    }


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags


def build_crl(
    *,
    issuer: Issuer,
    issuer_key: SigningKey,
    number: int,
    revoked: Sequence[RevokedEntry],
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """A complete CRL for `issuer`, numbered `number` (RFC 5280 §5.2.3: strictly increasing)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.certificate.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(issuer.authority_key_id, critical=False)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in revoked:
        item = x509.RevokedCertificateBuilder().serial_number(entry.serial)
        item = item.revocation_date(entry.revoked_at)
        # RFC 5280 §5.3.1: the reasonCode extension SHOULD be absent rather than unspecified.
        if entry.reason != x509.ReasonFlags.unspecified:
            item = item.add_extension(x509.CRLReason(entry.reason), critical=False)
        builder = builder.add_revoked_certificate(item.build())
    return builder.sign(issuer_key, hashes.SHA256())


def refresh_due(this_update: datetime, next_update: datetime, now: datetime) -> bool:
    """True once half the CRL's lifetime has passed: relying parties never see it expire."""
    return now >= this_update + (next_update - this_update) / 2


@dataclass(frozen=True, slots=True)
class PublicUrls:
    """Where relying parties fetch the CRL and the CA certificate (base_url + fixed paths)."""

    crl: str
    ca_cert: str

    @classmethod
    def of(cls, base_url: str, ca_name: str | None = None) -> PublicUrls:
        """The URLs of the default CA, or of the CA `ca_name` ([cas.<name>])."""
        base = base_url.rstrip("/")
        if ca_name is None:
            return cls(base + CRL_PATH, base + CA_CERT_PATH)
        return cls(f"{base}/crl/{ca_name}.crl", f"{base}/ca/{ca_name}.crt")

    def crl_distribution_points(self) -> x509.CRLDistributionPoints:
        point = x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(self.crl)],
            relative_name=None,
            reasons=None,
            crl_issuer=None,
        )
        return x509.CRLDistributionPoints([point])

    def authority_information_access(self) -> x509.AuthorityInformationAccess:
        access = x509.AccessDescription(
            AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(self.ca_cert)
        )
        return x509.AuthorityInformationAccess([access])
