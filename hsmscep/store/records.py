"""What the store keeps: issued certificates, revocations, CRLs, held requests, challenges.

Plain frozen values shared by the store port, its backends and the service; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

MAX_SERIAL = 2**160 - 1  # RFC 5280 §4.1.2.2: at most 20 octets


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """One issued certificate and what the store keeps about it."""

    serial: int
    subject: str
    sans: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    transaction_id: str
    requester_fingerprint: str
    public_key_sha256: str
    der: bytes
    status: str = "issued"
    issued_at: datetime | None = None

    def __post_init__(self) -> None:
        if not 0 < self.serial <= MAX_SERIAL:
            raise ValueError(f"serial {self.serial} is not a positive integer of at most 160 bits")
        for name in ("not_before", "not_after", "issued_at"):
            value = getattr(self, name)
            if value is not None and value.utcoffset() is None:
                raise ValueError(f"{name} must be timezone-aware")


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked certificate; `reason` is the RFC 5280 name (keyCompromise, superseded, ...)."""

    serial: int
    revoked_at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class CrlInfo:
    """A published CRL without its DER; `revision` is the revocation count it includes."""

    number: int
    revision: int
    this_update: datetime
    next_update: datetime


@dataclass(frozen=True, slots=True)
class CrlStatus:
    """The store's revocation revision and the newest published CRL, read together."""

    revision: int
    latest: CrlInfo | None


PendingStatus = Literal["pending", "approved", "rejected", "issued"]


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """A checked certificate request waiting for (or past) an operator's decision."""

    transaction_id: str
    csr_der: bytes
    requester_fingerprint: str  # SHA-256 of the pkiMessage signer certificate
    requester_key_sha256: str  # SHA-256 of the signer's SubjectPublicKeyInfo: polls must match
    requester_ip: str
    subject: str
    sans: tuple[str, ...]
    key_description: str  # "RSA 2048", "EC secp256r1"
    created_at: datetime
    status: PendingStatus = "pending"
    decided_at: datetime | None = None
    id: int = 0  # assigned by the store
    profile: str = "default"  # the enrollment profile it came in through

    def expired(self, now: datetime, ttl: timedelta) -> bool:
        """Still undecided after `ttl`: polls are refused and it can no longer be approved."""
        return self.status == "pending" and now - self.created_at >= ttl


@dataclass(frozen=True, slots=True)
class OneTimeChallenge:
    """A one-time enrollment challenge as stored: its SHA-256 (hex), never its value."""

    hash: str
    created_at: datetime
    expires_at: datetime
    subject_pattern: str | None = None
    san_pattern: str | None = None
    profile: str = ""  # '' is the server-wide pool
    used_at: datetime | None = None
    used_by: str | None = None


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What `hsmscep status` shows of one CA's store, read in one pass (no write)."""

    total: int  # certificates ever issued (revoked ones included)
    issued_today: int  # since 00:00 UTC
    revoked: int
    pending: int  # requests waiting for an operator's decision (expired ones included)
    challenges_outstanding: int  # one-time challenges neither used nor expired
    hourly: tuple[tuple[datetime, int], ...]  # (hour start, UTC) -> issued, oldest first
    crl: CrlInfo | None  # the newest published CRL
