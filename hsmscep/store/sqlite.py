"""The embedded store: CertStore, one SQLite file (WAL) behind hsmscep.service.ports.Store.

It opens the file and composes the per-table parts: certificates.py (group-committed
issuance), revocations.py, pending.py and challenges.py, over database.py's connections.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Literal

import aiosqlite

from hsmscep.errors import ConfigError, StoreError
from hsmscep.store.certificates import Certificates, connect_writer
from hsmscep.store.challenges import Challenges
from hsmscep.store.database import Database, connect, fetch, migrate
from hsmscep.store.pending import PendingRequests
from hsmscep.store.records import (
    CrlInfo,
    CrlStatus,
    IssuedCert,
    OneTimeChallenge,
    PendingRequest,
    Revocation,
    StoreStats,
)
from hsmscep.store.revocations import Revocations
from hsmscep.store.schema import MIGRATIONS, SCHEMA_VERSION
from hsmscep.store.stats import fold, queries

__all__ = ["SCHEMA_VERSION", "CertStore"]

# The schema history under the name tests knew it by before the split (schema.MIGRATIONS).
_MIGRATIONS = MIGRATIONS


class CertStore:
    """Everything the service keeps, in one SQLite file; put() returns only once the row is
    committed. Each method is the matching table part's."""

    def __init__(
        self,
        database: Database,
        writer: sqlite3.Connection,
        *,
        max_batch: int,
        linger: float = 0.0,
    ) -> None:
        self._db = database
        self._certificates = Certificates(database, writer, max_batch=max_batch, linger=linger)
        self._revocations = Revocations(database)
        self._pending = PendingRequests(database)
        self._challenges = Challenges(database)
        self._close_lock = asyncio.Lock()
        self._open = True

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        max_batch: int = 256,
        linger: float = 0.0,
    ) -> CertStore:
        """Open (creating and migrating if needed) the store at path.

        `linger`: seconds a certificate batch may wait for more rows; see batch_with()."""
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, not {max_batch}")
        if linger < 0:
            raise ConfigError(f"the commit linger must not be negative, not {linger}")
        where = os.fspath(path)
        reader: aiosqlite.Connection | None = None
        try:
            reader = await connect(where, synchronous)
            await migrate(reader, where)
            # Reads use their own connection so they never see a batch that is not committed yet.
            await fetch(reader, "PRAGMA query_only = ON")
            writer = await asyncio.to_thread(connect_writer, where, synchronous)
        except BaseException as exc:
            if reader is not None:
                await reader.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open certificate store {where}: {exc}") from exc
            raise
        return cls(Database(where, reader), writer, max_batch=max_batch, linger=linger)

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

    # ---- issued certificates (certificates.py): the hot path --------------------------------

    async def put(self, cert: IssuedCert) -> None:
        """Store cert; return once the transaction holding it has committed."""
        await self._certificates.put(cert)

    def submit(self, cert: IssuedCert, done: Callable[[BaseException | None], None]) -> None:
        """Queue cert from any thread; `done` runs on the commit thread with its outcome."""
        self._certificates.submit(cert, done)

    def batch_with(self, working: Callable[[], int]) -> Callable[[], None]:
        """Let a batch wait (up to the linger given to open()) for the `working()` rows being
        signed when it started. Returns what to call when some of that work ends without a row."""
        return self._certificates.batch_with(working)

    async def probe(self) -> None:
        async with self._db.transaction() as db:
            # A real page write (the revision rewritten as it is) that a full or read-only disk
            # refuses at COMMIT, and a statement that needs the certificates table to be there.
            await fetch(db, "UPDATE revocation_state SET revision = revision WHERE id = 1")
            await fetch(db, "DELETE FROM certificates WHERE serial = 'probe'")

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

    async def stats(self, now: datetime, days: int) -> StoreStats:
        """The counts `hsmscep status` shows, issuance per hour over the last `days`."""
        rows = [await self._db.read(sql, p) for sql, p in queries("sqlite", now, days)]
        return fold(rows, now, days)

    # ---- revocation and CRLs (revocations.py) -----------------------------------------------

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
        """Publish a CRL; False if another process already published this number."""
        return await self._revocations.put_crl(info, der)

    @asynccontextmanager
    async def crl_signing(self) -> AsyncIterator[None]:
        """Nothing to hold: the processes on one file settle a race by the CRL number."""
        yield

    # ---- pending requests, manual approval (pending.py) -------------------------------------

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
        """Approve or reject; see PendingRequests.decide_pending."""
        return await self._pending.decide_pending(request_id, decision, at, ttl)

    async def mark_pending_issued(self, request_id: int) -> None:
        """Record that the approved request's certificate is in the certificates table."""
        await self._pending.mark_pending_issued(request_id)

    # ---- one-time challenges (challenges.py) ------------------------------------------------

    async def add_challenge(self, challenge: OneTimeChallenge) -> None:
        """Store a freshly issued challenge (by its hash; the value itself is never stored)."""
        await self._challenges.add_challenge(challenge)

    async def get_challenge(self, digest: str, profile: str = "") -> OneTimeChallenge | None:
        """The stored challenge with this SHA-256 hex digest, used or not, if any."""
        return await self._challenges.get_challenge(digest, profile)

    async def consume_challenge(
        self, digest: str, at: datetime, used_by: str, profile: str = ""
    ) -> bool:
        """Mark the challenge used; True for exactly one caller (see Challenges)."""
        return await self._challenges.consume_challenge(digest, at, used_by, profile)
