"""CertStore against real SQLite files: round trip, group commit, duplicates, migrations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from hsmscep.errors import DuplicateSerial, DuplicateTransaction, StoreError
from hsmscep.store.records import IssuedCert
from hsmscep.store.schema import SCHEMA_VERSION
from hsmscep.store.sqlite import CertStore

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "certs.sqlite3"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[CertStore]:
    s = await CertStore.open(db_path)
    try:
        yield s
    finally:
        await s.close()


@contextlib.contextmanager
def plain(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A second, independent connection that is not the store's."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def make(serial: int, *, tid: str | None = None, subject: str | None = None) -> IssuedCert:
    return IssuedCert(
        serial=serial,
        subject=subject or f"CN=device-{serial},O=Example",
        sans=(f"DNS:d{serial}.example",),
        not_before=T0,
        not_after=T0 + timedelta(days=365),
        transaction_id=tid or f"tx-{serial}",
        requester_fingerprint="aa" * 32,
        public_key_sha256=f"{serial:064x}",
        der=b"\x30\x82" + serial.to_bytes(21, "big"),
    )


def batch_sizes(caplog: pytest.LogCaptureFixture) -> list[int]:
    """Rows per committed transaction, from the store's debug log."""
    found = (
        re.match(r"certificate batch committed: (\d+) rows", r.getMessage()) for r in caplog.records
    )
    return [int(m[1]) for m in found if m]


async def test_round_trip_every_field(store: CertStore) -> None:
    cest = timezone(timedelta(hours=2))
    cert = IssuedCert(
        serial=2**160 - 1,  # beyond sqlite's int64
        subject="CN=Zoë \\+ Co,O=Exämple\\, Inc.,C=DE",
        sans=(
            "DNS:a.example",
            "IP:10.0.0.1",
            "IP:2001:db8::1",
            "email:zoë@example.com",
            "URI:https://example.com/x?y=1",
            "UPN:zoe@corp.example",
        ),
        not_before=T0.astimezone(cest),
        not_after=T0 + timedelta(days=397, microseconds=1),
        transaction_id="4F2E7A1B" * 8,
        requester_fingerprint="0123456789abcdef" * 4,
        public_key_sha256="fedcba9876543210" * 4,
        der=bytes(range(256)) * 4,
        status="issued",
        issued_at=T0 - timedelta(seconds=1),
    )
    await store.put(cert)

    by_tid = await store.get_by_transaction(cert.transaction_id)
    by_serial = await store.get_by_serial(cert.serial)
    assert by_tid == cert
    assert by_serial == cert
    assert by_tid is not None
    assert by_tid.not_before.utcoffset() == timedelta(0)
    assert isinstance(by_tid.sans, tuple)
    assert await store.serials() == [2**160 - 1]
    assert await store.get_by_transaction("nope") is None
    assert await store.get_by_serial(12345) is None


async def test_issued_at_filled_in_when_missing(store: CertStore) -> None:
    before = datetime.now(UTC)
    await store.put(make(7))
    got = await store.get_by_serial(7)
    assert got is not None and got.issued_at is not None
    assert got.issued_at.tzinfo is not None
    assert got.issued_at >= before - timedelta(seconds=1)
    assert got.status == "issued"


def test_issued_cert_validation() -> None:
    with pytest.raises(ValueError, match="serial"):
        make(0)
    with pytest.raises(ValueError, match="serial"):
        make(2**160)
    with pytest.raises(ValueError, match="not_before"):
        replace(make(1), not_before=datetime(2026, 1, 1))


async def test_serial_order_is_numeric(store: CertStore) -> None:
    for serial in (0x100, 0xF, 2**100, 1):
        await store.put(make(serial))
    assert await store.serials() == [1, 0xF, 0x100, 2**100]


async def test_duplicate_serial_fails_only_that_caller(
    store: CertStore, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await store.put(make(1))
    caplog.set_level(logging.DEBUG, logger="hsmscep.store.certificates")
    results = await asyncio.gather(
        store.put(make(2)),
        store.put(make(1, tid="another-tx")),
        store.put(make(3)),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], DuplicateSerial)
    assert batch_sizes(caplog) == [3]  # really one batch, so the others survived a sibling error
    with plain(db_path) as conn:
        tids = {t for (t,) in conn.execute("SELECT transaction_id FROM certificates")}
    assert tids == {"tx-1", "tx-2", "tx-3"}


async def test_duplicate_transaction(store: CertStore) -> None:
    await store.put(make(1, tid="same"))
    results = await asyncio.gather(
        store.put(make(2, tid="same")), store.put(make(4)), return_exceptions=True
    )
    assert isinstance(results[0], DuplicateTransaction)
    assert not isinstance(results[0], DuplicateSerial)
    assert results[1] is None
    assert await store.serials() == [1, 4]
    got = await store.get_by_transaction("same")
    assert got is not None and got.serial == 1


async def test_duplicates_within_one_batch(store: CertStore) -> None:
    results = await asyncio.gather(
        store.put(make(5)), store.put(make(5, tid="other")), return_exceptions=True
    )
    assert results[0] is None
    assert isinstance(results[1], DuplicateSerial)
    assert await store.count() == 1


async def test_200_concurrent_puts_durable_when_put_returns(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hsmscep.store.certificates")
    store = await CertStore.open(db_path, max_batch=16)
    missing: list[int] = []
    try:
        with plain(db_path) as conn:

            async def put_and_check(serial: int) -> None:
                await store.put(make(serial))
                # Right after put() returns, another connection must already see the row.
                key = format(serial, "040x")
                if conn.execute("SELECT 1 FROM certificates WHERE serial = ?", (key,)).fetchone():
                    return
                missing.append(serial)

            await asyncio.gather(*(put_and_check(s) for s in range(1, 201)))
        assert missing == []
        assert await store.count() == 200
        assert await store.serials() == list(range(1, 201))
    finally:
        await store.close()
    sizes = batch_sizes(caplog)
    assert sum(sizes) == 200
    assert max(sizes) == 16  # grouped, and capped by max_batch
    assert len(sizes) < 200


async def test_sqlite_error_fails_whole_batch_and_rolls_back(
    store: CertStore, db_path: Path
) -> None:
    with plain(db_path) as conn:
        # A runtime error (not a constraint) on one row of the batch.
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON certificates BEGIN SELECT abs(CASE WHEN"
            " NEW.subject = 'CN=boom' THEN -9223372036854775807 - 1 ELSE 0 END); END"
        )
    results = await asyncio.gather(
        store.put(make(1)),
        store.put(make(2, subject="CN=boom")),
        store.put(make(3)),
        return_exceptions=True,
    )
    for result in results:
        assert type(result) is StoreError
        assert isinstance(result.__cause__, sqlite3.Error)
    assert await store.count() == 0
    with plain(db_path) as conn:
        conn.execute("DROP TRIGGER boom")
    await store.put(make(1))  # the writer survived and the connection is usable
    assert await store.serials() == [1]


async def test_migrations_idempotent_and_versioned(db_path: Path) -> None:
    store = await CertStore.open(db_path)
    await store.put(make(1))
    await store.close()
    store = await CertStore.open(db_path, synchronous="NORMAL")
    try:
        assert await store.count() == 1
    finally:
        await store.close()
    with plain(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert SCHEMA_VERSION >= 1
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master ORDER BY name")]
    assert names.count("certificates") == 1
    # Only the indexes that queries use (or that append: not_after) cost a write per certificate.
    with plain(db_path) as conn:
        indexes = {
            n
            for (n,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'certificates'"
                " AND sql IS NOT NULL"
            )
        }
    assert indexes == {"certificates_not_after", "certificates_revoked"}


async def test_version_5_store_loses_its_unused_indexes_and_keeps_its_rows(db_path: Path) -> None:
    store = await CertStore.open(db_path)
    await store.put(make(1))
    await store.close()
    with plain(db_path) as conn:  # what a version-5 store looked like
        conn.execute("CREATE INDEX certificates_subject ON certificates (subject)")
        conn.execute("CREATE INDEX certificates_requester ON certificates (requester_fingerprint)")
        conn.execute("CREATE INDEX certificates_public_key ON certificates (public_key_sha256)")
        conn.execute("PRAGMA user_version = 5")
        conn.commit()
    store = await CertStore.open(db_path)
    try:
        assert await store.serials() == [1]
        await store.put(make(2))
    finally:
        await store.close()
    with plain(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        left = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert not left & {"certificates_subject", "certificates_requester", "certificates_public_key"}


async def test_concurrent_opens_migrate_once(db_path: Path) -> None:
    stores = await asyncio.gather(*(CertStore.open(db_path) for _ in range(6)))
    try:
        await asyncio.gather(*(s.put(make(i + 1)) for i, s in enumerate(stores)))
        for s in stores:
            assert await s.count() == 6
    finally:
        for s in stores:
            await s.close()
    with plain(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


async def test_newer_schema_refused(db_path: Path) -> None:
    with plain(db_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match=rf"99.*{SCHEMA_VERSION}"):
        await CertStore.open(db_path)
    with plain(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (99,)
        assert conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone() == (0,)


async def test_open_unreachable_path_is_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        await CertStore.open(tmp_path / "no-such-dir" / "certs.sqlite3")


async def test_close_flushes_then_refuses(db_path: Path) -> None:
    store = await CertStore.open(db_path)
    tasks = [asyncio.create_task(store.put(make(s))) for s in range(1, 51)]
    await asyncio.sleep(0)  # let every put enqueue
    await store.close()
    assert all(t.done() and t.exception() is None for t in tasks)
    with plain(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM certificates").fetchone() == (50,)
    with pytest.raises(StoreError, match="store is closed"):
        await store.put(make(99))
    with pytest.raises(StoreError, match="store is closed"):
        await store.count()
    await store.close()  # idempotent


async def test_data_survives_reopen(db_path: Path) -> None:
    store = await CertStore.open(db_path)
    cert = make(0xDEADBEEF)
    await store.put(cert)
    await store.close()
    store = await CertStore.open(db_path)
    try:
        got = await store.get_by_serial(0xDEADBEEF)
        assert got is not None
        assert got.issued_at is not None
        assert got == replace(cert, issued_at=got.issued_at)
        assert await store.get_by_transaction(cert.transaction_id) == got
    finally:
        await store.close()


async def test_probe_writes_nothing_and_fails_without_the_table(
    store: CertStore, db_path: Path
) -> None:
    await store.probe()
    assert await store.count() == 0 and (await store.crl_status()).revision == 0
    with sqlite3.connect(db_path) as db:
        db.execute("ALTER TABLE certificates RENAME TO certificates_away")
    with pytest.raises(StoreError):
        await store.probe()
    with sqlite3.connect(db_path) as db:
        db.execute("ALTER TABLE certificates_away RENAME TO certificates")
    await store.probe()
