"""Held requests in SQLite ([enroll] approval = "manual"): the pending_requests table and its
rows. Rare writes, each in a transaction of its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal

from hsmscep.errors import RequestConflict, UnknownRequest
from hsmscep.store.database import Database, fetch
from hsmscep.store.records import PendingRequest
from hsmscep.store.schema import iso

_COLUMNS = (
    "id, transaction_id, csr_der, requester_fingerprint, requester_key_sha256, requester_ip,"
    " subject, sans_json, key_description, created_at, status, decided_at, profile"
)
_SELECT = f"SELECT {_COLUMNS} FROM pending_requests"
# id, status and decided_at are the store's: a new request is 'pending', undecided.
_INSERT = (
    "INSERT INTO pending_requests (transaction_id, csr_der, requester_fingerprint,"
    " requester_key_sha256, requester_ip, subject, sans_json, key_description,"
    " created_at, status, profile) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)"
    " ON CONFLICT (transaction_id) DO NOTHING"
)


def _to_row(request: PendingRequest) -> tuple[object, ...]:
    return (
        request.transaction_id,
        bytes(request.csr_der),
        request.requester_fingerprint,
        request.requester_key_sha256,
        request.requester_ip,
        request.subject,
        json.dumps(list(request.sans), ensure_ascii=False),
        request.key_description,
        iso(request.created_at),
        request.profile,
    )


def _from_row(row: Any) -> PendingRequest:
    rid, tid, csr, fingerprint, key_hash, ip, subject, sans, key, created, status, decided = row[
        :12
    ]
    return PendingRequest(
        profile=row[12],
        id=int(rid),
        transaction_id=tid,
        csr_der=bytes(csr),
        requester_fingerprint=fingerprint,
        requester_key_sha256=key_hash,
        requester_ip=ip,
        subject=subject,
        sans=tuple(json.loads(sans)),
        key_description=key,
        created_at=datetime.fromisoformat(created),
        status=status,
        decided_at=datetime.fromisoformat(decided) if decided is not None else None,
    )


def decided(
    current: PendingRequest,
    decision: Literal["approved", "rejected"],
    at: datetime,
    ttl: Callable[[str], timedelta],
) -> str | None:
    """The status `decision` gives the stored request, or None if it already has it (an
    approval of an issued request included). RequestConflict if it was decided otherwise or
    has expired. Both backends decide by this, on the row read in their write transaction."""
    done = "approved" if decision == "approved" else "rejected"
    if current.status == done or (done == "approved" and current.status == "issued"):
        return None
    if current.status != "pending":
        raise RequestConflict(f"request {current.id} is already {current.status}")
    if current.expired(at, ttl(current.profile)):
        raise RequestConflict(f"request {current.id} has expired")
    return done


class PendingRequests:
    """Requests waiting for an operator's decision, and what was decided."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def add_pending(self, request: PendingRequest) -> PendingRequest:
        """Store a request for approval; a transactionID already stored returns that row."""
        async with self._db.transaction() as db:
            await fetch(db, _INSERT, _to_row(request))
            rows = await fetch(db, f"{_SELECT} WHERE transaction_id = ?", (request.transaction_id,))
        return _from_row(rows[0])

    async def get_pending(self, transaction_id: str) -> PendingRequest | None:
        """The request stored for approval under this transactionID, if any."""
        rows = await self._db.read(f"{_SELECT} WHERE transaction_id = ?", (transaction_id,))
        return _from_row(rows[0]) if rows else None

    async def get_pending_by_id(self, request_id: int) -> PendingRequest | None:
        """The request stored under this id, if any."""
        rows = await self._db.read(f"{_SELECT} WHERE id = ?", (request_id,))
        return _from_row(rows[0]) if rows else None

    async def pending_requests(self) -> list[PendingRequest]:
        """Every request still waiting for a decision (expired ones included), oldest first."""
        rows = await self._db.read(f"{_SELECT} WHERE status = 'pending' ORDER BY id")
        return [_from_row(row) for row in rows]

    async def decide_pending(
        self,
        request_id: int,
        decision: Literal["approved", "rejected"],
        at: datetime,
        ttl: Callable[[str], timedelta],
    ) -> tuple[PendingRequest, bool]:
        """Approve or reject; (request, False) if it already had this decision (idempotent).
        `ttl` gives the pending TTL of the request's profile.

        Raises UnknownRequest for an unknown id and RequestConflict if the request was decided
        otherwise or has expired.
        """
        if at.utcoffset() is None:
            raise ValueError("at must be timezone-aware")
        async with self._db.transaction() as db:
            rows = await fetch(db, f"{_SELECT} WHERE id = ?", (request_id,))
            if not rows:
                raise UnknownRequest(f"no pending request with id {request_id}")
            current = _from_row(rows[0])
            done = decided(current, decision, at, ttl)
            if done is None:
                return current, False
            await fetch(
                db,
                "UPDATE pending_requests SET status = ?, decided_at = ? WHERE id = ?",
                (done, iso(at), request_id),
            )
            rows = await fetch(db, f"{_SELECT} WHERE id = ?", (request_id,))
        return _from_row(rows[0]), True

    async def mark_pending_issued(self, request_id: int) -> None:
        """Record that the approved request's certificate is in the certificates table."""
        async with self._db.transaction() as db:
            await fetch(
                db,
                "UPDATE pending_requests SET status = 'issued'"
                " WHERE id = ? AND status = 'approved'",
                (request_id,),
            )
