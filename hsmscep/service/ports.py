"""The ports: what the service needs from the store and from the keys, as Protocols.

The service is typed against these only; `hsmscep.store` (SQLite or PostgreSQL) and
`hsmscep.hsm` (PKCS#11 workers, or software keys in tests) implement them structurally and
are wired in by the web layer's lifespan. No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Literal, Protocol

from hsmscep.protocol.certrep import ResponseSigner
from hsmscep.protocol.cms import CertId
from hsmscep.protocol.keys import ExternalRsaKey, SigningKey
from hsmscep.store.records import (
    CrlInfo,
    CrlStatus,
    IssuedCert,
    OneTimeChallenge,
    PendingRequest,
    Revocation,
)


class KeySet(Protocol):
    """One signing worker's keys; every operation is bytes in, bytes out, in the HSM."""

    @property
    def ca_key(self) -> SigningKey:
        """Signs certificates."""
        ...

    @property
    def crl_key(self) -> SigningKey:
        """Signs CRLs: the CA key (a key object of its own, so that its time is told apart)."""
        ...

    @property
    def response_signer(self) -> ResponseSigner:
        """The RA certificate and key that sign CertReps."""
        ...

    @property
    def decrypt_keys(self) -> Sequence[tuple[CertId, ExternalRsaKey]]:
        """The RA decryption keys, each with the certificate clients encrypt to."""
        ...

    @property
    def previous_signers(self) -> Sequence[tuple[CertId, ResponseSigner]]:
        """The RA keys of earlier rollover generations, by their certificate: they sign the
        answer to a request encrypted to them (a client that cached the old GetCACert)."""
        ...


class CertificateStore(Protocol):
    """Issued certificates. A serial or transactionID is stored at most once."""

    async def put(self, cert: IssuedCert) -> None:
        """Store and commit; DuplicateSerial / DuplicateTransaction on a clash."""
        ...

    def submit(self, cert: IssuedCert, done: Callable[[BaseException | None], None]) -> None:
        """Queue for the next group commit (any thread); `done` runs once it is durable."""
        ...

    def batch_with(self, working: Callable[[], int]) -> Callable[[], None]:
        """Let a commit wait for the `working()` certificates being signed; returns the hook
        the pool calls when a job ends."""
        ...

    async def probe(self) -> None:
        """A small durable write touching the certificates table; StoreError if the store
        cannot take one (full or read-only disk, broken schema). Changes no data."""
        ...

    async def get_by_transaction(self, transaction_id: str) -> IssuedCert | None: ...

    async def get_by_serial(self, serial: int) -> IssuedCert | None: ...


class RevocationStore(Protocol):
    """Revocations and the CRLs built from them; CRL numbers are unique in the store."""

    async def revoke(self, serial: int, reason: str, at: datetime) -> tuple[Revocation, bool]: ...

    async def revocations(self) -> list[Revocation]: ...

    async def crl_status(self) -> CrlStatus: ...

    async def get_crl(self, number: int) -> bytes | None: ...

    async def put_crl(self, info: CrlInfo, der: bytes) -> bool:
        """Publish; False if another process published this number first."""
        ...

    def crl_signing(self) -> AbstractAsyncContextManager[None]:
        """Held while a CRL is signed: on a shared store, one node at a time."""
        ...


class PendingStore(Protocol):
    """Requests held for an operator's decision (manual approval)."""

    async def add_pending(self, request: PendingRequest) -> PendingRequest: ...

    async def get_pending(self, transaction_id: str) -> PendingRequest | None: ...

    async def get_pending_by_id(self, request_id: int) -> PendingRequest | None: ...

    async def pending_requests(self) -> list[PendingRequest]: ...

    async def decide_pending(
        self,
        request_id: int,
        decision: Literal["approved", "rejected"],
        at: datetime,
        ttl: Callable[[str], timedelta],
    ) -> tuple[PendingRequest, bool]: ...

    async def mark_pending_issued(self, request_id: int) -> None: ...


class ChallengeStore(Protocol):
    """One-time challenges, kept as SHA-256 only and consumed atomically."""

    async def add_challenge(self, challenge: OneTimeChallenge) -> None: ...

    async def get_challenge(self, digest: str, profile: str = "") -> OneTimeChallenge | None: ...

    async def consume_challenge(
        self, digest: str, at: datetime, used_by: str, profile: str = ""
    ) -> bool:
        """True for exactly one caller across every process sharing the store."""
        ...


class Store(CertificateStore, RevocationStore, PendingStore, ChallengeStore, Protocol):
    """Everything the service keeps, in one backend."""

    async def close(self) -> None: ...
