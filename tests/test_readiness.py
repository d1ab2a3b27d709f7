"""/healthz and /readyz: the checks of service/readiness.py over a real SQLite store, and the
endpoint over the real app in process (tests/inprocess.py). HSM loss and return on a real
token: tests/test_hsm_loss.py."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmscep.service import readiness
from hsmscep.service.readiness import Readiness
from hsmscep.store.backends import open_store
from hsmscep.store.records import CrlInfo
from tests.inprocess import ca_certificate, serve, soft_ca

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def ca_cert() -> x509.Certificate:
    key = rsa.generate_private_key(65537, 2048)
    # Made as of NOW, not of when the fixture runs: a long suite reaches this module minutes
    # after NOW was taken, and the CA would not be valid yet "now".
    return ca_certificate(key, x509.Name.from_rfc4514_string("CN=readiness CA"), NOW)


def checks_at(db: Path, cert: x509.Certificate, at: datetime, crl: bool = True) -> dict[str, str]:
    """The checks of a fresh Readiness over the SQLite store `db`, as seen at `at`."""

    async def run() -> dict[str, str]:
        store = await open_store(db)
        try:
            if crl and (await store.crl_status()).latest is None:
                await store.put_crl(CrlInfo(1, 0, NOW, NOW + timedelta(hours=24)), b"crl")
            return await Readiness(store, {"CA": cert}, lambda: at).checks()
        finally:
            await store.close()

    return asyncio.run(run())


def test_all_ok_now(tmp_path: Path, ca_cert: x509.Certificate) -> None:
    assert checks_at(tmp_path / "s.db", ca_cert, NOW) == {"store": "ok", "crl": "ok", "ca": "ok"}


def test_no_crl_yet_is_not_ready(tmp_path: Path, ca_cert: x509.Certificate) -> None:
    assert checks_at(tmp_path / "s.db", ca_cert, NOW, crl=False)["crl"] == "no CRL published yet"


def test_crl_past_next_update(tmp_path: Path, ca_cert: x509.Certificate) -> None:
    checks = checks_at(tmp_path / "s.db", ca_cert, NOW + timedelta(hours=25))
    assert checks["crl"].startswith("CRL 1 past nextUpdate "), checks
    assert checks["store"] == "ok" and checks["ca"] == "ok"


def test_ca_expired_and_not_yet_valid(tmp_path: Path, ca_cert: x509.Certificate) -> None:
    later = checks_at(tmp_path / "s.db", ca_cert, ca_cert.not_valid_after_utc + timedelta(1))
    assert later["ca"].startswith("CA certificate expired "), later
    earlier = checks_at(tmp_path / "s.db", ca_cert, ca_cert.not_valid_before_utc - timedelta(1))
    assert earlier["ca"].startswith("CA certificate not valid before "), earlier


def test_store_not_writable_seen_once_the_cached_answer_is_old(
    tmp_path: Path, ca_cert: x509.Certificate
) -> None:
    db = tmp_path / "s.db"
    checks_at(db, ca_cert, NOW)  # creates the schema and a CRL
    ticks = [0.0]

    async def run() -> list[str]:
        store = await open_store(db)
        try:
            ready = Readiness(store, {"CA": ca_cert}, lambda: NOW, lambda: ticks[0])
            seen = [(await ready.checks())["store"]]
            with sqlite3.connect(db) as conn:
                conn.execute("ALTER TABLE certificates RENAME TO certificates_away")
            seen.append((await ready.checks())["store"])  # cached: no second write yet
            ticks[0] += readiness.CACHE_SECONDS
            seen.append((await ready.checks())["store"])
            return seen
        finally:
            await store.close()

    first, cached, probed = asyncio.run(run())
    assert (first, cached) == ("ok", "ok")
    assert probed.startswith("not writable: "), probed


def test_healthz_and_readyz_follow_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = soft_ca(tmp_path, "readiness-ca")
    with serve(ca) as http:
        health = http.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        # Right after start the first CRL may still be being signed: not ready until it is.
        deadline = time.monotonic() + 30
        while (ready := http.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
            assert ready.json()["checks"]["crl"] == "no CRL published yet", ready.text
            time.sleep(readiness.CACHE_SECONDS / 4)
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["ready"] is True
        assert {k: v for k, v in body["checks"].items() if k != "hsm"} == {
            "store": "ok",
            "crl": "ok",
            "ca": "ok",
        }
        assert body["checks"]["hsm"]["ready"] is True
        with sqlite3.connect(ca.db_path) as conn:
            conn.execute("ALTER TABLE certificates RENAME TO certificates_away")
        monkeypatch.setattr(readiness, "CACHE_SECONDS", 0.0)
        broken = http.get("/readyz")
        assert broken.status_code == 503 and broken.headers["retry-after"]
        checks = broken.json()["checks"]
        assert checks["store"].startswith("not writable: "), checks
        assert checks["crl"] == "ok" and checks["ca"] == "ok"
        with sqlite3.connect(ca.db_path) as conn:
            conn.execute("ALTER TABLE certificates_away RENAME TO certificates")
        assert http.get("/readyz").status_code == 200
