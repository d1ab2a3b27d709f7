"""The statements behind StoreStats and how their rows become one: shared by both backends
and by the read-only opening of `hsmscep status` (readonly.py). Pure.

Timestamps are stored as ISO 8601 text in UTC (schema.iso), so "since" is a text comparison
with a fixed-width prefix and an hour is the first 13 characters ("2026-12-07T05").
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from hsmscep.store.records import CrlInfo, StoreStats
from hsmscep.store.schema import iso_fixed

Dialect = Literal["sqlite", "postgresql"]
MAX_DAYS = 366

# PostgreSQL compares text by the database's collation; "C" is byte order, as in SQLite.
_COUNTS = """SELECT
    (SELECT COUNT(*) FROM certificates),
    (SELECT COUNT(*) FROM certificates WHERE issued_at{c} >= {p1}),
    (SELECT COUNT(*) FROM certificates WHERE revoked_at IS NOT NULL),
    (SELECT COUNT(*) FROM pending_requests WHERE status = 'pending'),
    (SELECT COUNT(*) FROM challenges WHERE used_at IS NULL AND expires_at{c} > {p2})"""
_HOURLY = (
    "SELECT substr(issued_at, 1, 13), COUNT(*) FROM certificates"
    " WHERE issued_at{c} >= {p1} GROUP BY substr(issued_at, 1, 13)"
)
_LATEST_CRL = (
    "SELECT number, revision, this_update, next_update FROM crls ORDER BY number DESC LIMIT 1"
)


def first_hour(now: datetime, days: int) -> datetime:
    """The start of the oldest hour shown: `days` x 24 hours, the current one the last."""
    hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return hour - timedelta(hours=24 * days - 1)


def queries(dialect: Dialect, now: datetime, days: int) -> list[tuple[str, tuple[object, ...]]]:
    """The three statements (counts, issuance per hour, newest CRL) and their parameters."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_DAYS}, not {days}")
    if dialect == "sqlite":
        marks: dict[str, str] = {"c": "", "p1": "?", "p2": "?"}
    else:
        marks = {"c": ' COLLATE "C"', "p1": "$1", "p2": "$2"}
    today = now.astimezone(UTC).strftime("%Y-%m-%d")
    since = first_hour(now, days).strftime("%Y-%m-%dT%H")
    return [
        (_COUNTS.format(**marks), (today, iso_fixed(now))),
        (_HOURLY.format(**marks), (since,)),
        (_LATEST_CRL, ()),
    ]


def fold(results: Sequence[Sequence[Any]], now: datetime, days: int) -> StoreStats:
    """StoreStats from the rows of queries(), in their order; hours without issuance are 0."""
    counts, hourly, crls = results
    total, today, revoked, pending, challenges = (int(n) for n in counts[0])
    by_hour = {str(hour): int(n) for hour, n in hourly}
    start = first_hour(now, days)
    hours = [start + timedelta(hours=i) for i in range(24 * days)]
    crl = None
    if crls:
        number, revision, this_update, next_update = crls[0]
        crl = CrlInfo(
            int(number),
            int(revision),
            datetime.fromisoformat(this_update),
            datetime.fromisoformat(next_update),
        )
    return StoreStats(
        total=total,
        issued_today=today,
        revoked=revoked,
        pending=pending,
        challenges_outstanding=challenges,
        hourly=tuple((h, by_hour.get(h.strftime("%Y-%m-%dT%H"), 0)) for h in hours),
        crl=crl,
    )
