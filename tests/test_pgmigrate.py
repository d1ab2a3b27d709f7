"""`hsmscep store migrate`: an SQLite store copied into PostgreSQL, verified, safe to rerun."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hsmscep.store.postgres import PgStore
from hsmscep.store.records import CrlInfo, IssuedCert, OneTimeChallenge, PendingRequest
from hsmscep.store.sqlite import CertStore
from tests.pgcluster import PASSWORD, Cluster

NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)


def cert(serial: int) -> IssuedCert:
    return IssuedCert(
        serial=serial,
        subject=f"CN=m{serial}",
        sans=("dns:m.example",),
        not_before=NOW,
        not_after=NOW + timedelta(days=90),
        transaction_id=f"m-{serial}",
        requester_fingerprint="01" * 32,
        public_key_sha256="02" * 32,
        der=serial.to_bytes(20, "big") * 40,
        issued_at=NOW,
    )


def pending(tid: str) -> PendingRequest:
    return PendingRequest(
        transaction_id=tid,
        csr_der=b"\x30\x00",
        requester_fingerprint="03" * 32,
        requester_key_sha256="04" * 32,
        requester_ip="192.0.2.7",
        subject=f"CN={tid}",
        sans=(),
        key_description="EC secp256r1",
        created_at=NOW,
    )


async def fill(path: Path) -> None:
    store = await CertStore.open(path, max_batch=64)
    try:
        await asyncio.gather(*(store.put(cert(10_000 + i)) for i in range(300)))
        for serial in (10_001, 10_050, 10_299):
            await store.revoke(serial, "keyCompromise", NOW)
        await store.put_crl(CrlInfo(1, 0, NOW, NOW + timedelta(days=1)), b"crl-one")
        await store.put_crl(CrlInfo(2, 3, NOW, NOW + timedelta(days=1)), b"crl-two")
        first = await store.add_pending(pending("p-1"))
        await store.add_pending(pending("p-2"))
        await store.decide_pending(first.id, "approved", NOW, lambda _: timedelta(days=3))
        await store.add_challenge(OneTimeChallenge("aa" * 32, NOW, NOW + timedelta(days=1)))
        await store.add_challenge(OneTimeChallenge("bb" * 32, NOW, NOW + timedelta(days=1)))
        assert await store.consume_challenge("aa" * 32, NOW, "someone")
    finally:
        await store.close()


def run_migrate(source: Path, url: str, password_file: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hsmscep", "store", "migrate", "--from", str(source)]
    command += ["--to", url, "--password-file", str(password_file)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_migrate_copies_everything_verifies_and_reruns(pg_cluster: Cluster, tmp_path: Path) -> None:
    source = tmp_path / "hsmscep.db"
    asyncio.run(fill(source))
    pg_cluster.fresh_database("migrated")
    url = pg_cluster.tcp_url("migrated")
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD + "\n")

    done = run_migrate(source, url, password_file)
    assert done.returncode == 0, done.stderr
    assert "certificates: 300 rows" in done.stdout and "challenges: 2 rows" in done.stdout
    assert PASSWORD not in done.stdout + done.stderr

    async def compare() -> None:
        old = await CertStore.open(source)
        new = await PgStore.open(url, password=PASSWORD)
        try:
            assert await new.serials() == await old.serials()
            for serial in (10_000, 10_050, 10_299):
                assert await new.get_by_serial(serial) == await old.get_by_serial(serial)
            assert await new.revocations() == await old.revocations()
            assert await new.crl_status() == await old.crl_status()
            assert await new.get_crl(2) == b"crl-two"
            assert await new.get_pending("p-1") == await old.get_pending("p-1")
            assert await new.pending_requests() == await old.pending_requests()
            assert await new.get_challenge("aa" * 32) == await old.get_challenge("aa" * 32)
            # Held requests keep their ids, and new ones do not reuse them.
            added = await new.add_pending(pending("p-3"))
            assert added.id > 2
        finally:
            await old.close()
            await new.close()

    asyncio.run(compare())

    # A revocation in the source since the first run comes over on the second.
    async def revoke_more() -> None:
        store = await CertStore.open(source)
        try:
            await store.revoke(10_100, "superseded", NOW)
        finally:
            await store.close()

    asyncio.run(revoke_more())
    pg_cluster.sql("DELETE FROM pending_requests WHERE transaction_id = 'p-3'", "migrated")
    again = run_migrate(source, url, password_file)
    assert again.returncode == 0, again.stderr

    async def after_rerun() -> None:
        new = await PgStore.open(url, password=PASSWORD)
        try:
            assert await new.count() == 300
            assert 10_100 in {r.serial for r in await new.revocations()}
            assert (await new.crl_status()).revision == 4
        finally:
            await new.close()

    asyncio.run(after_rerun())

    # A target that holds rows the source does not is reported, not silently merged.
    pg_cluster.sql(
        "INSERT INTO challenges (hash, profile, created_at, expires_at)"
        " VALUES ('cc', '', '2026', '2027')",
        "migrated",
    )
    differs = run_migrate(source, url, password_file)
    assert differs.returncode == 4  # a store error (docs/operations.md exit codes)
    assert "challenges: 2 rows in the source, 3 in the target" in differs.stderr


@pytest.mark.parametrize(
    ("to", "message"),
    [("sqlite:///x.db", "postgresql:// URL"), ("postgresql://u:pw@h/db", "must not carry")],
)
def test_migrate_refuses_bad_targets(tmp_path: Path, to: str, message: str) -> None:
    (tmp_path / "pw").write_text("x\n")
    done = run_migrate(tmp_path / "none.db", to, tmp_path / "pw")
    assert done.returncode == 2 and message in done.stderr
