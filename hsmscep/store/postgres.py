"""The shared store: PgStore, one PostgreSQL database behind hsmscep.service.ports.Store.

Several hsmscep nodes open the same database: serials and transactionIDs are unique keys, a
challenge is consumed by one conditional UPDATE, decisions lock their row, CRL numbers are a
primary key and one node at a time signs a CRL (an advisory lock, crl_signing()).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg

from hsmscep.errors import ConfigError, StoreError
from hsmscep.store.pgcertificates import PgCertificates
from hsmscep.store.pgdatabase import (
    CONNECTION_ERRORS,
    PgDatabase,
    connect,
    create_pool,
    migrate,
    redact,
    store_error,
)
from hsmscep.store.pgschema import CRL_LOCK
from hsmscep.store.pgtables import PgChallenges, PgPendingRequests, PgRevocations
from hsmscep.store.records import (
    CrlInfo,
    CrlStatus,
    IssuedCert,
    OneTimeChallenge,
    PendingRequest,
    Revocation,
    StoreStats,
)
from hsmscep.store.stats import fold, queries

POOL_SIZE = 8  # reads and rare writes; the group commit has a connection of its own


class PgStore:
    """Everything the service keeps, in one PostgreSQL database; put() returns only once the
    row is committed. Each method is the matching table part's."""

    def __init__(
        self, database: PgDatabase, url: str, password: str | None, *, max_batch: int, linger: float
    ) -> None:
        self._db = database
        self._certificates = PgCertificates(
            database, url, password, max_batch=max_batch, linger=linger
        )
        self._revocations = PgRevocations(database)
        self._pending = PgPendingRequests(database)
        self._challenges = PgChallenges(database)
        self._close_lock = asyncio.Lock()
        self._open = True

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        password: str | None = None,
        max_batch: int = 256,
        linger: float = 0.0,
        pool_size: int = POOL_SIZE,
    ) -> PgStore:
        """Connect, apply the migrations the database lacks (refusing a newer schema), and
        start the group-commit thread. `url` is postgresql://user@host/db (no password)."""
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, not {max_batch}")
        if linger < 0:
            raise ConfigError(f"the commit linger must not be negative, not {linger}")
        where = redact(url)
        pool: Any = None
        try:
            conn = await connect(url, password)
            try:
                await migrate(conn, where)
            finally:
                await conn.close()
            pool = await create_pool(url, password, max(2, pool_size))
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            if pool is not None:
                await pool.close()
            raise store_error(f"cannot open certificate store {where}", exc) from exc
        return cls(PgDatabase(where, pool), url, password, max_batch=max_batch, linger=linger)

    async def close(self) -> None:
        """Refuse new puts, commit everything queued, close the connections. Idempotent."""
        self._db.closed = True
        async with self._close_lock:
            if not self._open:
                return
            self._open = False
            try:
                await self._certificates.close()
            finally:
                await self._db.close()

    @asynccontextmanager
    async def crl_signing(self) -> AsyncIterator[None]:
        """Held while this node signs a CRL: other nodes wait, then find it published."""
        async with self._db.session_lock(CRL_LOCK):
            yield

    # ---- issued certificates (pgcertificates.py): the hot path ------------------------------

    async def put(self, cert: IssuedCert) -> None:
        """Store cert; return once the transaction holding it has committed."""
        await self._certificates.put(cert)

    def submit(self, cert: IssuedCert, done: Callable[[BaseException | None], None]) -> None:
        """Queue cert from any thread; `done` runs on the commit thread with its outcome."""
        self._certificates.submit(cert, done)

    def batch_with(self, working: Callable[[], int]) -> Callable[[], None]:
        """Let a batch wait (up to the linger) for the `working()` rows being signed."""
        return self._certificates.batch_with(working)

    async def probe(self) -> None:
        async with self._db.transaction() as conn:
            # A real row write (the revision rewritten as it is) that a database refusing
            # writes fails, and a statement that needs the certificates table.
            await conn.execute("UPDATE revocation_state SET revision = revision WHERE id = 1")
            await conn.execute("DELETE FROM certificates WHERE serial = 'probe'")

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
        rows = [await self._db.read(sql, *p) for sql, p in queries("postgresql", now, days)]
        return fold(rows, now, days)

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
        """Publish a CRL; False if another node already published this number."""
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
        """Approve or reject; see PgPendingRequests.decide_pending."""
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
        """Mark the challenge used; True for exactly one caller across every node."""
        return await self._challenges.consume_challenge(digest, at, used_by, profile)


__all__ = ["PgStore", "StoreError"]
