"""Revocations, CRLs, held requests and one-time challenges in PostgreSQL: the rare writes,
each one transaction on a pooled connection. Rows are spelled as in SQLite (the row codecs of
revocations.py, pending.py and challenges.py); each write that must happen once cluster-wide
is one conditional statement or takes a row lock first.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Literal

from hsmscep.errors import UnknownRequest
from hsmscep.store.challenges import _COLUMNS as _CHALLENGE_COLUMNS
from hsmscep.store.challenges import _from_row as _challenge_from_row
from hsmscep.store.pending import _COLUMNS as _PENDING_COLUMNS
from hsmscep.store.pending import _from_row as _pending_from_row
from hsmscep.store.pending import _to_row as _pending_to_row
from hsmscep.store.pending import decided
from hsmscep.store.pgdatabase import PgDatabase
from hsmscep.store.records import (
    CrlInfo,
    CrlStatus,
    OneTimeChallenge,
    PendingRequest,
    Revocation,
)
from hsmscep.store.revocations import (
    _KEEP_CRLS,
    _revocation_from_row,
    prior_revocation,
    revocation_key,
)
from hsmscep.store.schema import iso, iso_fixed

_PENDING = f"SELECT {_PENDING_COLUMNS} FROM pending_requests"
_PENDING_INSERT = (
    "INSERT INTO pending_requests (transaction_id, csr_der, requester_fingerprint,"
    " requester_key_sha256, requester_ip, subject, sans_json, key_description,"
    " created_at, status, profile) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', $10)"
    " ON CONFLICT (transaction_id) DO NOTHING"
)
_CHALLENGE = f"SELECT {_CHALLENGE_COLUMNS} FROM challenges"


class PgRevocations:
    """Revoked certificates, the revocation revision and the published CRLs."""

    def __init__(self, database: PgDatabase) -> None:
        self._db = database

    async def revoke(self, serial: int, reason: str, at: datetime) -> tuple[Revocation, bool]:
        """Mark a certificate revoked; (revocation, False) if it already was (idempotent)."""
        key = revocation_key(serial, at)
        async with self._db.transaction() as db:
            # FOR UPDATE: of two nodes revoking one certificate, the second sees the first.
            row = await db.fetchrow(
                "SELECT revoked_at, revocation_reason FROM certificates"
                " WHERE serial = $1 FOR UPDATE",
                key,
            )
            prior = prior_revocation(serial, None if row is None else tuple(row))
            if prior is not None:
                return prior, False
            await db.execute(
                "UPDATE certificates SET status = 'revoked', revoked_at = $1,"
                " revocation_reason = $2 WHERE serial = $3",
                iso(at),
                reason,
                key,
            )
            await db.execute("UPDATE revocation_state SET revision = revision + 1")
        return Revocation(serial, at, reason), True

    async def revocations(self) -> list[Revocation]:
        """Every revoked certificate, by serial."""
        rows = await self._db.read(
            "SELECT serial, revoked_at, revocation_reason FROM certificates"
            " WHERE revoked_at IS NOT NULL ORDER BY serial"
        )
        return [_revocation_from_row(tuple(row)) for row in rows]

    async def crl_status(self) -> CrlStatus:
        """The revocation revision and the newest CRL's metadata, in one read."""
        [row] = await self._db.read(
            "SELECT s.revision, c.number, c.revision, c.this_update, c.next_update"
            " FROM revocation_state s LEFT JOIN (SELECT * FROM crls ORDER BY number DESC LIMIT 1)"
            " c ON TRUE"
        )
        revision, number, crl_revision, this_update, next_update = row
        latest = None
        if number is not None:
            latest = CrlInfo(
                int(number),
                int(crl_revision),
                datetime.fromisoformat(this_update),
                datetime.fromisoformat(next_update),
            )
        return CrlStatus(int(revision), latest)

    async def get_crl(self, number: int) -> bytes | None:
        """The DER of CRL `number`, if stored."""
        rows = await self._db.read("SELECT der FROM crls WHERE number = $1", number)
        return bytes(rows[0][0]) if rows else None

    async def put_crl(self, info: CrlInfo, der: bytes) -> bool:
        """Publish a CRL; False if another node already published this number."""
        async with self._db.transaction() as db:
            inserted = await db.fetchval(
                "INSERT INTO crls (number, revision, this_update, next_update, der)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (number) DO NOTHING RETURNING number",
                info.number,
                info.revision,
                iso(info.this_update),
                iso(info.next_update),
                der,
            )
            await db.execute("DELETE FROM crls WHERE number <= $1", info.number - _KEEP_CRLS)
        return inserted is not None


class PgPendingRequests:
    """Requests waiting for an operator's decision, and what was decided."""

    def __init__(self, database: PgDatabase) -> None:
        self._db = database

    async def add_pending(self, request: PendingRequest) -> PendingRequest:
        """Store a request for approval; a transactionID already stored returns that row."""
        async with self._db.transaction() as db:
            await db.execute(_PENDING_INSERT, *_pending_to_row(request))
            row = await db.fetchrow(f"{_PENDING} WHERE transaction_id = $1", request.transaction_id)
        return _pending_from_row(tuple(row))

    async def get_pending(self, transaction_id: str) -> PendingRequest | None:
        """The request stored for approval under this transactionID, if any."""
        rows = await self._db.read(f"{_PENDING} WHERE transaction_id = $1", transaction_id)
        return _pending_from_row(tuple(rows[0])) if rows else None

    async def get_pending_by_id(self, request_id: int) -> PendingRequest | None:
        """The request stored under this id, if any."""
        rows = await self._db.read(f"{_PENDING} WHERE id = $1", request_id)
        return _pending_from_row(tuple(rows[0])) if rows else None

    async def pending_requests(self) -> list[PendingRequest]:
        """Every request still waiting for a decision (expired ones included), oldest first."""
        rows = await self._db.read(f"{_PENDING} WHERE status = 'pending' ORDER BY id")
        return [_pending_from_row(tuple(row)) for row in rows]

    async def decide_pending(
        self,
        request_id: int,
        decision: Literal["approved", "rejected"],
        at: datetime,
        ttl: Callable[[str], timedelta],
    ) -> tuple[PendingRequest, bool]:
        """Approve or reject; (request, False) if it already had this decision (idempotent).
        UnknownRequest for an unknown id, RequestConflict if decided otherwise or expired."""
        if at.utcoffset() is None:
            raise ValueError("at must be timezone-aware")
        async with self._db.transaction() as db:
            row = await db.fetchrow(f"{_PENDING} WHERE id = $1 FOR UPDATE", request_id)
            if row is None:
                raise UnknownRequest(f"no pending request with id {request_id}")
            current = _pending_from_row(tuple(row))
            done = decided(current, decision, at, ttl)
            if done is None:
                return current, False
            row = await db.fetchrow(
                f"UPDATE pending_requests SET status = $1, decided_at = $2 WHERE id = $3"
                f" RETURNING {_PENDING_COLUMNS}",
                done,
                iso(at),
                request_id,
            )
        return _pending_from_row(tuple(row)), True

    async def mark_pending_issued(self, request_id: int) -> None:
        """Record that the approved request's certificate is in the certificates table."""
        async with self._db.transaction() as db:
            await db.execute(
                "UPDATE pending_requests SET status = 'issued'"
                " WHERE id = $1 AND status = 'approved'",
                request_id,
            )


class PgChallenges:
    """One-time challenges, each consumed at most once across every node on the database."""

    def __init__(self, database: PgDatabase) -> None:
        self._db = database

    async def add_challenge(self, challenge: OneTimeChallenge) -> None:
        """Store a freshly issued challenge (by its hash; the value itself is never stored)."""
        async with self._db.transaction() as db:
            await db.execute(
                "INSERT INTO challenges (hash, profile, subject_pattern, san_pattern,"
                " created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
                challenge.hash,
                challenge.profile,
                challenge.subject_pattern,
                challenge.san_pattern,
                iso_fixed(challenge.created_at),
                iso_fixed(challenge.expires_at),
            )

    async def get_challenge(self, digest: str, profile: str = "") -> OneTimeChallenge | None:
        """The stored challenge with this SHA-256 hex digest, used or not, if any."""
        rows = await self._db.read(
            f"{_CHALLENGE} WHERE hash = $1 AND profile = $2", digest, profile
        )
        return _challenge_from_row(tuple(rows[0])) if rows else None

    async def consume_challenge(
        self, digest: str, at: datetime, used_by: str, profile: str = ""
    ) -> bool:
        """Mark the challenge used; True for exactly one caller, False if unknown/used/expired.

        One conditional UPDATE: PostgreSQL re-checks `used_at IS NULL` on the row after a
        concurrent update commits (READ COMMITTED), so of racing nodes only one changes it.
        """
        if at.utcoffset() is None:
            raise ValueError("at must be timezone-aware")
        async with self._db.transaction() as db:
            changed = await db.fetchval(
                "UPDATE challenges SET used_at = $1, used_by = $2 WHERE hash = $3 AND profile = $4"
                " AND used_at IS NULL AND expires_at > $1 RETURNING hash",
                iso_fixed(at),
                used_by,
                digest,
                profile,
            )
        return changed is not None
