"""StoreStats on both backends: exact counts and issuance per hour from a known data set, the
same from an open store and from the read-only opening `hsmscep status` uses, which writes
nothing, migrates nothing and refuses a schema it does not know."""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from hsmscep.errors import StoreError
from hsmscep.store.postgres import PgStore
from hsmscep.store.readonly import NoStore, read_stats
from hsmscep.store.records import (
    CrlInfo,
    IssuedCert,
    OneTimeChallenge,
    PendingRequest,
    StoreStats,
)
from hsmscep.store.sqlite import CertStore
from tests.pgcluster import PASSWORD, Cluster

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 5, 1, 12, 30, tzinfo=UTC)
ISSUED = (
    NOW - timedelta(minutes=10),  # 12:20 today
    NOW - timedelta(minutes=25),  # 12:05
    NOW - timedelta(minutes=40),  # 11:50
    datetime(2026, 5, 1, tzinfo=UTC),  # midnight: today
    datetime(2026, 4, 30, 23, 59, 59, 999999, tzinfo=UTC),  # yesterday
    NOW - timedelta(days=3),  # in a 7-day window, not in a 1-day one
    NOW - timedelta(days=10),  # in neither
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def cert(index: int, issued_at: datetime) -> IssuedCert:
    return IssuedCert(
        serial=1000 + index,
        subject=f"CN=device {index}",
        sans=(),
        not_before=issued_at,
        not_after=issued_at + timedelta(days=365),
        transaction_id=f"tid-{index}",
        requester_fingerprint="ab" * 32,
        public_key_sha256="cd" * 32,
        der=b"\x30" * 300,
        issued_at=issued_at,
    )


def pending(index: int) -> PendingRequest:
    return PendingRequest(
        transaction_id=f"pending-{index}",
        csr_der=b"\x30" * 100,
        requester_fingerprint="ab" * 32,
        requester_key_sha256="ef" * 32,
        requester_ip="192.0.2.1",
        subject=f"CN=held {index}",
        sans=(),
        key_description="RSA 2048",
        created_at=NOW - timedelta(hours=1),
    )


def challenge(name: str, expires: datetime) -> OneTimeChallenge:
    digest = hashlib.sha256(name.encode()).hexdigest()
    return OneTimeChallenge(digest, NOW - timedelta(hours=2), expires)


async def fill(store: CertStore | PgStore) -> None:
    """Seven certificates (two revoked), three held requests (one rejected), three one-time
    challenges (one outstanding, one expired, one used) and two CRLs."""
    for index, issued_at in enumerate(ISSUED):
        await store.put(cert(index, issued_at))
    await store.revoke(1002, "keyCompromise", NOW)
    await store.revoke(1005, "superseded", NOW)
    held = [await store.add_pending(pending(i)) for i in range(3)]
    await store.decide_pending(held[0].id, "rejected", NOW, lambda _: timedelta(hours=72))
    await store.add_challenge(challenge("open", NOW + timedelta(hours=1)))
    await store.add_challenge(challenge("expired", NOW - timedelta(minutes=1)))
    await store.add_challenge(challenge("used", NOW + timedelta(hours=1)))
    used = hashlib.sha256(b"used").hexdigest()
    assert await store.consume_challenge(used, NOW - timedelta(minutes=5), "CN=x")
    for number in (1, 2):
        info = CrlInfo(number, number, NOW - timedelta(hours=3 - number), NOW + timedelta(days=1))
        assert await store.put_crl(info, b"\x30\x00")


def check(stats: StoreStats, days: int) -> None:
    assert (stats.total, stats.issued_today, stats.revoked) == (7, 4, 2)
    assert (stats.pending, stats.challenges_outstanding) == (2, 1)
    assert stats.crl is not None and stats.crl.number == 2
    assert len(stats.hourly) == 24 * days
    assert stats.hourly[-1][0] == datetime(2026, 5, 1, 12, tzinfo=UTC)
    nonzero = {hour.strftime("%m-%dT%H"): n for hour, n in stats.hourly if n}
    expected = {"05-01T12": 2, "05-01T11": 1, "05-01T00": 1, "04-30T23": 1}
    if days == 7:
        expected["04-28T12"] = 1
    assert nonzero == expected


async def test_sqlite_counts_exactly(tmp_path: Path) -> None:
    path = tmp_path / "stats.db"
    store = await CertStore.open(path)
    try:
        await fill(store)
        check(await store.stats(NOW, 7), 7)
        check(await read_stats(path, password=None, now=NOW, days=1), 1)  # beside a writer
    finally:
        await store.close()
    before = path.read_bytes()
    check(await read_stats(path, password=None, now=NOW, days=7), 7)
    assert path.read_bytes() == before


async def test_sqlite_read_only_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(NoStore, match="does not exist yet"):
        await read_stats(missing, password=None, now=NOW, days=7)
    assert not missing.exists()
    path = tmp_path / "newer.db"
    await (await CertStore.open(path)).close()
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        await read_stats(path, password=None, now=NOW, days=7)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (99,)
    with pytest.raises(ValueError, match="days must be between 1 and 366"):
        await read_stats(path, password=None, now=NOW, days=0)


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> str:
    pg_cluster.fresh_database("stats")
    return pg_cluster.tcp_url("stats")


async def test_postgres_counts_exactly(pg_url: str, pg_cluster: Cluster) -> None:
    store = await PgStore.open(pg_url, password=PASSWORD)
    try:
        await fill(store)
        check(await store.stats(NOW, 7), 7)
        check(await read_stats(pg_url, password=PASSWORD, now=NOW, days=1), 1)
    finally:
        await store.close()
    conn = await asyncpg.connect(pg_cluster.url("stats"))
    try:
        await conn.execute("UPDATE hsmscep_schema SET version = 99")
        with pytest.raises(StoreError, match="schema version 99 is newer"):
            await read_stats(pg_url, password=PASSWORD, now=NOW, days=7)
        assert await conn.fetchval("SELECT version FROM hsmscep_schema") == 99
        await conn.execute("DROP TABLE hsmscep_schema")
        with pytest.raises(StoreError, match="holds no hsmscep store"):
            await read_stats(pg_url, password=PASSWORD, now=NOW, days=7)
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="cannot connect"):
        await read_stats(pg_url, password="wrong", now=NOW, days=7)
