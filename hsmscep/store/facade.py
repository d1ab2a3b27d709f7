"""What both backends' stores share: the methods that hand each call to the part owning the
table (issued certificates, revocations and CRLs, held requests, one-time challenges).

CertStore (sqlite.py) and PgStore (postgres.py) compose their own parts and keep only what
differs: opening, the write probe and the CRL signing lock. Closing is shared: the part
that commits certificates first, then the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Literal, Protocol

from hsmscep.store.records import (
    CrlInfo,
    CrlStatus,
    IssuedCert,
    OneTimeChallenge,
    PendingRequest,
    Revocation,
)

Done = Callable[[BaseException | None], None]


class _Certificates(Protocol):
    async def put(self, cert: IssuedCert) -> None: ...
    def submit(self, cert: IssuedCert, done: Done) -> None: ...
    def batch_with(self, working: Callable[[], int]) -> Callable[[], None]: ...
    async def get_by_transaction(self, transaction_id: str) -> IssuedCert | None: ...
    async def get_by_serial(self, serial: int) -> IssuedCert | None: ...
    async def count(self) -> int: ...
    async def serials(self) -> list[int]: ...
    async def close(self) -> None: ...


class _Revocations(Protocol):
    async def revoke(self, serial: int, reason: str, at: datetime) -> tuple[Revocation, bool]: ...
    async def revocations(self) -> list[Revocation]: ...
    async def crl_status(self) -> CrlStatus: ...
    async def get_crl(self, number: int) -> bytes | None: ...
    async def put_crl(self, info: CrlInfo, der: bytes) -> bool: ...


class _Pending(Protocol):
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


class _Challenges(Protocol):
    async def add_challenge(self, challenge: OneTimeChallenge) -> None: ...
    async def get_challenge(self, digest: str, profile: str) -> OneTimeChallenge | None: ...
    async def consume_challenge(
        self, digest: str, at: datetime, used_by: str, profile: str
    ) -> bool: ...


class _Database(Protocol):
    closed: bool  # set: the backend's reads and writes are refused

    async def close(self) -> None: ...


class StoreFacade:
    """The table parts' methods, one call each; a backend sets the four parts and its
    database, then calls _opened()."""

    _db: _Database
    _certificates: _Certificates
    _revocations: _Revocations
    _pending: _Pending
    _challenges: _Challenges

    def _opened(self) -> None:
        self._close_lock = asyncio.Lock()
        self._open = True

    async def close(self) -> None:
        """Refuse new puts, commit everything queued, close the database. Idempotent."""
        self._db.closed = True
        async with self._close_lock:
            if not self._open:
                return
            self._open = False
            try:
                await self._certificates.close()
            finally:
                await self._db.close()

    # ---- issued certificates: the hot path -------------------------------------------------

    async def put(self, cert: IssuedCert) -> None:
        """Store cert; return once the transaction holding it has committed."""
        await self._certificates.put(cert)

    def submit(self, cert: IssuedCert, done: Done) -> None:
        """Queue cert from any thread; `done` runs on the commit thread with its outcome."""
        self._certificates.submit(cert, done)

    def batch_with(self, working: Callable[[], int]) -> Callable[[], None]:
        """Let a batch wait (up to the linger given to open()) for the `working()` rows being
        signed when it started. Returns what to call when some of that work ends without a row."""
        return self._certificates.batch_with(working)

    async def get_by_transaction(self, transaction_id: str) -> IssuedCert | None:
        """The certificate issued for this transactionID, if any."""
        return await self._certificates.get_by_transaction(transaction_id)

    async def get_by_serial(self, serial: int) -> IssuedCert | None:
        """The certificate with this serial number, if any."""
        return await self._certificates.get_by_serial(serial)

    async def count(self) -> int:
        """Number of stored certificates."""
        return await self._certificates.count()

    async def serials(self) -> list[int]:
        """All stored serial numbers, ascending."""
        return await self._certificates.serials()

    # ---- revocation and CRLs ----------------------------------------------------------------

    async def revoke(self, serial: int, reason: str, at: datetime) -> tuple[Revocation, bool]:
        """Mark a certificate revoked; (revocation, False) if it already was (idempotent)."""
        return await self._revocations.revoke(serial, reason, at)

    async def revocations(self) -> list[Revocation]:
        """Every revoked certificate, by serial."""
        return await self._revocations.revocations()

    async def crl_status(self) -> CrlStatus:
        """The revocation revision and the newest CRL's metadata, in one read."""
        return await self._revocations.crl_status()

    async def get_crl(self, number: int) -> bytes | None:
        """The DER of CRL `number`, if stored."""
        return await self._revocations.get_crl(number)

    async def put_crl(self, info: CrlInfo, der: bytes) -> bool:
        """Publish a CRL; False if another process or node already published this number."""
        return await self._revocations.put_crl(info, der)

    # ---- pending requests, manual approval --------------------------------------------------

    async def add_pending(self, request: PendingRequest) -> PendingRequest:
        """Store a request for approval; a transactionID already stored returns that row."""
        return await self._pending.add_pending(request)

    async def get_pending(self, transaction_id: str) -> PendingRequest | None:
        """The request stored for approval under this transactionID, if any."""
        return await self._pending.get_pending(transaction_id)

    async def get_pending_by_id(self, request_id: int) -> PendingRequest | None:
        """The request stored under this id, if any."""
        return await self._pending.get_pending_by_id(request_id)

    async def pending_requests(self) -> list[PendingRequest]:
        """Every request still waiting for a decision (expired ones included), oldest first."""
        return await self._pending.pending_requests()

    async def decide_pending(
        self,
        request_id: int,
        decision: Literal["approved", "rejected"],
        at: datetime,
        ttl: Callable[[str], timedelta],
    ) -> tuple[PendingRequest, bool]:
        """Approve or reject; see the backend's decide_pending."""
        return await self._pending.decide_pending(request_id, decision, at, ttl)

    async def mark_pending_issued(self, request_id: int) -> None:
        """Record that the approved request's certificate is in the certificates table."""
        await self._pending.mark_pending_issued(request_id)

    # ---- one-time challenges ----------------------------------------------------------------

    async def add_challenge(self, challenge: OneTimeChallenge) -> None:
        """Store a freshly issued challenge (by its hash; the value itself is never stored)."""
        await self._challenges.add_challenge(challenge)

    async def get_challenge(self, digest: str, profile: str = "") -> OneTimeChallenge | None:
        """The stored challenge with this SHA-256 hex digest, used or not, if any."""
        return await self._challenges.get_challenge(digest, profile)

    async def consume_challenge(
        self, digest: str, at: datetime, used_by: str, profile: str = ""
    ) -> bool:
        """Mark the challenge used; True for exactly one caller across every process and node."""
        return await self._challenges.consume_challenge(digest, at, used_by, profile)
