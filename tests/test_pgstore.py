"""The PostgreSQL backend on a real throwaway cluster: every store guarantee between two
PgStore instances (two nodes) on one database, the schema history, and the password."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from hsmscep.errors import DuplicateSerial, DuplicateTransaction, StoreError
from hsmscep.store.postgres import PgStore
from hsmscep.store.records import CrlInfo, IssuedCert, OneTimeChallenge, PendingRequest
from hsmscep.store.schema import SCHEMA_VERSION
from tests.pgcluster import PASSWORD, Cluster

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def pg_url(pg_cluster: Cluster, request: pytest.FixtureRequest) -> str:
    name = "t_" + request.node.name.replace("[", "_").replace("]", "")[:50].lower()
    pg_cluster.fresh_database(name)
    return pg_cluster.tcp_url(name)


@pytest.fixture
async def nodes(pg_url: str) -> AsyncIterator[tuple[PgStore, PgStore]]:
    """Two stores on one database, as two hsmscep nodes have."""
    a = await PgStore.open(pg_url, password=PASSWORD, max_batch=16)
    b = await PgStore.open(pg_url, password=PASSWORD, max_batch=16, linger=0.005)
    yield a, b
    await a.close()
    await b.close()


def cert(serial: int, tid: str | None = None) -> IssuedCert:
    return IssuedCert(
        serial=serial,
        subject=f"CN=device {serial}",
        sans=("dns:a.example", "ip:192.0.2.1"),
        not_before=NOW,
        not_after=NOW + timedelta(days=365),
        transaction_id=tid or f"tid-{serial}",
        requester_fingerprint="ab" * 32,
        public_key_sha256="cd" * 32,
        der=bytes([serial % 256]) * 700,
        issued_at=NOW,
    )


async def test_round_trip_and_both_nodes_see_it(nodes: tuple[PgStore, PgStore]) -> None:
    a, b = nodes
    original = cert(2**159 + 5)
    await a.put(original)
    assert await b.get_by_serial(original.serial) == original
    assert await b.get_by_transaction(original.transaction_id) == original
    assert await b.get_by_serial(2**170) is None


async def test_serial_and_transaction_unique_across_nodes(nodes: tuple[PgStore, PgStore]) -> None:
    a, b = nodes
    await a.put(cert(7))
    with pytest.raises(DuplicateSerial):
        await b.put(cert(7, tid="another"))
    with pytest.raises(DuplicateTransaction):
        await b.put(cert(8, tid="tid-7"))
    assert await a.serials() == [7]


async def test_concurrent_batches_from_two_nodes_all_durable(
    nodes: tuple[PgStore, PgStore],
) -> None:
    a, b = nodes
    # 200 puts split over both nodes, 10 of them clashing serials: exactly those fail.
    certs = [cert(1000 + i) for i in range(190)] + [cert(1000 + i, f"dup-{i}") for i in range(10)]
    results = await asyncio.gather(
        *((a if i % 2 else b).put(c) for i, c in enumerate(certs)), return_exceptions=True
    )
    failures = [r for r in results if r is not None]
    assert len(failures) == 10 and all(isinstance(f, DuplicateSerial) for f in failures)
    assert await a.count() == 190
    assert await b.serials() == list(range(1000, 1190))


async def test_one_time_challenge_consumed_once_across_nodes(
    nodes: tuple[PgStore, PgStore],
) -> None:
    a, b = nodes
    await a.add_challenge(OneTimeChallenge("e3" * 32, NOW, NOW + timedelta(hours=1)))
    results = await asyncio.gather(
        *((a, b)[i % 2].consume_challenge("e3" * 32, NOW, f"client-{i}") for i in range(50))
    )
    assert sum(results) == 1
    stored = await b.get_challenge("e3" * 32)
    assert stored is not None and stored.used_by is not None
    assert not await a.consume_challenge("e3" * 32, NOW, "late")


async def test_pending_decided_on_one_node_seen_by_the_other(
    nodes: tuple[PgStore, PgStore],
) -> None:
    a, b = nodes
    request = PendingRequest(
        transaction_id="held-1",
        csr_der=b"\x30\x03\x02\x01\x01",
        requester_fingerprint="aa" * 32,
        requester_key_sha256="bb" * 32,
        requester_ip="192.0.2.9",
        subject="CN=held",
        sans=(),
        key_description="RSA 2048",
        created_at=NOW,
        profile="manual",
    )
    stored = await a.add_pending(request)
    again = await b.add_pending(request)
    assert again.id == stored.id and stored.status == "pending"

    def ttl(profile: str) -> timedelta:
        return timedelta(hours=72)

    decisions = await asyncio.gather(
        a.decide_pending(stored.id, "approved", NOW, ttl),
        b.decide_pending(stored.id, "approved", NOW, ttl),
    )
    assert sorted(changed for _, changed in decisions) == [False, True]
    seen = await b.get_pending("held-1")
    assert seen is not None and seen.status == "approved" and seen.profile == "manual"
    await b.mark_pending_issued(stored.id)
    assert (await a.get_pending_by_id(stored.id)).status == "issued"  # type: ignore[union-attr]
    assert await a.pending_requests() == []


async def test_revocations_and_crl_numbers_unique(nodes: tuple[PgStore, PgStore]) -> None:
    a, b = nodes
    await a.put(cert(31))
    results = await asyncio.gather(
        a.revoke(31, "keyCompromise", NOW), b.revoke(31, "superseded", NOW)
    )
    assert sorted(changed for _, changed in results) == [False, True]
    status = await b.crl_status()
    assert status.revision == 1 and status.latest is None
    assert [r.serial for r in await b.revocations()] == [31]
    info = CrlInfo(1, 1, NOW, NOW + timedelta(days=1))
    published = await asyncio.gather(a.put_crl(info, b"crl-a"), b.put_crl(info, b"crl-b"))
    assert sorted(published) == [False, True]
    der = await a.get_crl(1)
    assert der in (b"crl-a", b"crl-b")
    latest = (await a.crl_status()).latest
    assert latest is not None and latest.number == 1 and latest.revision == 1


async def test_crl_signing_held_by_one_node_at_a_time(nodes: tuple[PgStore, PgStore]) -> None:
    a, b = nodes
    events: list[str] = []
    inside = asyncio.Event()

    async def first() -> None:
        async with a.crl_signing():
            events.append("a in")
            inside.set()
            await asyncio.sleep(0.2)  # b must wait this out, however long it is
            events.append("a out")

    async def second() -> None:
        await inside.wait()
        async with b.crl_signing():
            events.append("b in")

    await asyncio.gather(first(), second())
    assert events == ["a in", "a out", "b in"]


async def test_schema_versioned_and_newer_refused(pg_cluster: Cluster, pg_url: str) -> None:
    stores = await asyncio.gather(*(PgStore.open(pg_url, password=PASSWORD) for _ in range(4)))
    for store in stores:
        await store.close()
    conn = await asyncpg.connect(pg_url, password=PASSWORD)
    try:
        assert await conn.fetchval("SELECT version FROM hsmscep_schema") == SCHEMA_VERSION
        indexes = {r[0] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
        assert "certificates_not_after" in indexes and "certificates_subject" not in indexes
        await conn.execute("UPDATE hsmscep_schema SET version = $1", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="newer than this hsmscep knows"):
        await PgStore.open(pg_url, password=PASSWORD)


async def test_wrong_password_and_no_server_are_store_errors(
    pg_cluster: Cluster, pg_url: str
) -> None:
    with pytest.raises(StoreError, match="cannot open") as caught:
        await PgStore.open(pg_url, password="Bad-Pass-9f3")
    assert "Bad-Pass-9f3" not in str(caught.value)
    with pytest.raises(StoreError, match="cannot open"):
        await PgStore.open("postgresql://hsmscep@127.0.0.1:1/none", password=PASSWORD)


async def test_close_flushes_then_refuses(pg_url: str) -> None:
    store = await PgStore.open(pg_url, password=PASSWORD)
    pending = [asyncio.ensure_future(store.put(cert(500 + i))) for i in range(20)]
    await asyncio.sleep(0)
    await store.close()
    await asyncio.gather(*pending)
    with pytest.raises(StoreError, match="closed"):
        await store.put(cert(600))
    reopened = await PgStore.open(pg_url, password=PASSWORD)
    try:
        assert await reopened.count() == 20
    finally:
        await reopened.close()


async def test_clash_inside_one_batch_fails_only_that_caller(
    nodes: tuple[PgStore, PgStore], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = nodes
    await b.put(cert(1))
    caplog.set_level(logging.DEBUG, logger="hsmscep.store.pgcertificates")
    results = await asyncio.gather(
        a.put(cert(2)), a.put(cert(1, tid="another")), a.put(cert(3)), return_exceptions=True
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], DuplicateSerial)
    sizes = [
        int(r.getMessage().split(": ")[1].split()[0])
        for r in caplog.records
        if r.getMessage().startswith("certificate batch committed")
    ]
    assert sizes == [3]  # one batch: its statement failed, and the rows went in one by one
    assert await b.serials() == [1, 2, 3]


async def test_probe_writes_nothing_and_fails_without_the_table(
    nodes: tuple[PgStore, PgStore], pg_url: str
) -> None:
    a, b = nodes
    await a.put(cert(7))
    await a.probe()
    assert await b.count() == 1 and (await a.crl_status()).revision == 0
    conn = await asyncpg.connect(pg_url, password=PASSWORD)
    try:
        await conn.execute("ALTER TABLE certificates RENAME TO certificates_away")
        with pytest.raises(StoreError):
            await a.probe()
    finally:
        await conn.execute("ALTER TABLE certificates_away RENAME TO certificates")
        await conn.close()
    await a.probe()
