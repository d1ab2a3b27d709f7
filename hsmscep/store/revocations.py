"""Revocations and CRLs in SQLite: revocation columns on the certificates row, the revision
that counts them, and the published CRLs. Rare writes, each in a transaction of its own.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from hsmscep.errors import UnknownCertificate
from hsmscep.store.database import Database, fetch
from hsmscep.store.records import MAX_SERIAL, CrlInfo, CrlStatus, Revocation
from hsmscep.store.schema import iso, serial_from_key, serial_key

_KEEP_CRLS = 16


def _revocation_from_row(row: Any) -> Revocation:
    serial, at, reason = row
    return Revocation(serial_from_key(serial), datetime.fromisoformat(at), reason)


def revocation_key(serial: int, at: datetime) -> str | None:
    """The stored key of the certificate to revoke (None: no valid serial, so none is stored)."""
    if at.utcoffset() is None:
        raise ValueError("at must be timezone-aware")
    return serial_key(serial) if 0 < serial <= MAX_SERIAL else None


def prior_revocation(serial: int, row: Any) -> Revocation | None:
    """The revocation the stored (revoked_at, reason) row already holds, if any; both backends
    read it in the transaction that revokes. UnknownCertificate for no row."""
    if row is None:
        raise UnknownCertificate(f"no certificate with serial {serial:x} was issued here")
    revoked_at, reason = row
    return (
        None
        if revoked_at is None
        else Revocation(serial, datetime.fromisoformat(revoked_at), reason)
    )


class Revocations:
    """Revoked certificates, the revocation revision and the published CRLs."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def revoke(self, serial: int, reason: str, at: datetime) -> tuple[Revocation, bool]:
        """Mark a certificate revoked; (revocation, False) if it already was (idempotent)."""
        key = revocation_key(serial, at)
        async with self._db.transaction() as db:
            rows = await fetch(
                db,
                "SELECT revoked_at, revocation_reason FROM certificates WHERE serial = ?",
                (key,),
            )
            prior = prior_revocation(serial, rows[0] if rows else None)
            if prior is not None:
                return prior, False
            await fetch(
                db,
                "UPDATE certificates SET status = 'revoked', revoked_at = ?,"
                " revocation_reason = ? WHERE serial = ?",
                (iso(at), reason, key),
            )
            await fetch(db, "UPDATE revocation_state SET revision = revision + 1")
        return Revocation(serial, at, reason), True

    async def revocations(self) -> list[Revocation]:
        """Every revoked certificate, by serial."""
        rows = await self._db.read(
            "SELECT serial, revoked_at, revocation_reason FROM certificates"
            " WHERE revoked_at IS NOT NULL ORDER BY serial"
        )
        return [_revocation_from_row(row) for row in rows]

    async def crl_status(self) -> CrlStatus:
        """The revocation revision and the newest CRL's metadata, in one read."""
        [(revision, number, crl_revision, this_update, next_update)] = await self._db.read(
            "SELECT s.revision, c.number, c.revision, c.this_update, c.next_update"
            " FROM revocation_state s LEFT JOIN (SELECT * FROM crls ORDER BY number DESC LIMIT 1)"
            " c ON 1"
        )
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
        rows = await self._db.read("SELECT der FROM crls WHERE number = ?", (number,))
        return bytes(rows[0][0]) if rows else None

    async def put_crl(self, info: CrlInfo, der: bytes) -> bool:
        """Publish a CRL; False if another process already published this number."""
        async with self._db.transaction() as db:
            await fetch(
                db,
                "INSERT INTO crls (number, revision, this_update, next_update, der)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (number) DO NOTHING",
                (info.number, info.revision, iso(info.this_update), iso(info.next_update), der),
            )
            [(inserted,)] = await fetch(db, "SELECT changes()")
            # Old CRLs are only kept for a look back; relying parties fetch the newest.
            await fetch(db, "DELETE FROM crls WHERE number <= ?", (info.number - _KEEP_CRLS,))
        return bool(inserted)
