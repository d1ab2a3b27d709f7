"""One-time challenges in SQLite ([enroll] challenge_mode = "one_time"): the challenges table
and its rows. Only a challenge's SHA-256 is stored; consuming one is one conditional UPDATE.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from hsmscep.store.database import Database, fetch
from hsmscep.store.records import OneTimeChallenge
from hsmscep.store.schema import iso_fixed

_COLUMNS = "hash, profile, subject_pattern, san_pattern, created_at, expires_at, used_at, used_by"
_SELECT = f"SELECT {_COLUMNS} FROM challenges"


def _from_row(row: Any) -> OneTimeChallenge:
    digest, profile, subject_pattern, san_pattern, created, expires, used, used_by = row
    return OneTimeChallenge(
        hash=digest,
        profile=profile,
        subject_pattern=subject_pattern,
        san_pattern=san_pattern,
        created_at=datetime.fromisoformat(created),
        expires_at=datetime.fromisoformat(expires),
        used_at=datetime.fromisoformat(used) if used is not None else None,
        used_by=used_by,
    )


class Challenges:
    """One-time challenges, each consumed at most once across every process on the file."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def add_challenge(self, challenge: OneTimeChallenge) -> None:
        """Store a freshly issued challenge (by its hash; the value itself is never stored)."""
        async with self._db.transaction() as db:
            await fetch(
                db,
                "INSERT INTO challenges (hash, profile, subject_pattern, san_pattern,"
                " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    challenge.hash,
                    challenge.profile,
                    challenge.subject_pattern,
                    challenge.san_pattern,
                    iso_fixed(challenge.created_at),
                    iso_fixed(challenge.expires_at),
                ),
            )

    async def get_challenge(self, digest: str, profile: str = "") -> OneTimeChallenge | None:
        """The stored challenge with this SHA-256 hex digest, used or not, if any."""
        rows = await self._db.read(f"{_SELECT} WHERE hash = ? AND profile = ?", (digest, profile))
        return _from_row(rows[0]) if rows else None

    async def consume_challenge(
        self, digest: str, at: datetime, used_by: str, profile: str = ""
    ) -> bool:
        """Mark the challenge used; True for exactly one caller, False if unknown/used/expired.

        One conditional UPDATE in its own transaction: of concurrent callers, only the first
        to take SQLite's write lock sees a changed row.
        """
        if at.utcoffset() is None:
            raise ValueError("at must be timezone-aware")
        async with self._db.transaction() as db:
            await fetch(
                db,
                "UPDATE challenges SET used_at = ?, used_by = ? WHERE hash = ? AND profile = ?"
                " AND used_at IS NULL AND expires_at > ?",
                (iso_fixed(at), used_by, digest, profile, iso_fixed(at)),
            )
            [(changed,)] = await fetch(db, "SELECT changes()")
        return bool(changed)
