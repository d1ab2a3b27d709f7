"""`hsmscep status` on real stores: after real enrollments through a live server (SQLite,
read beside it), and on PostgreSQL; the counts exactly, text and JSON, the plot as a real
PNG and SVG, the clear failure without matplotlib, and that it never writes the store nor
needs the HSM."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from hsmscep.cli.banner import fingerprint
from hsmscep.store.postgres import PgStore
from hsmscep.store.sqlite import CertStore
from tests.conftest import DevCa, Server, make_ca, start_server
from tests.pgcluster import PASSWORD, Cluster
from tests.test_enroll import (
    SUCCESS,
    fetch_ca_certs,
    issued_cert,
    new_request,
    open_reply,
    post_pki,
)
from tests.test_store_stats import fill

PENDING = "3"
PROFILES = """
[profiles.otp]
challenge_mode = "one_time"

[profiles.manual]
challenge_file = "challenge"
approval = "manual"
"""
# status must not load the PKCS#11 module: a module that does not exist proves it.
NO_HSM = {"HSMSCEP_PKCS11_MODULE": "/nonexistent/libno-hsm.so"}


def hsmscep(ca: DevCa, *args: str, env: Mapping[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "hsmscep", *args, "--config", str(ca.config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ) | dict(env or {}),
    )


def status(ca: DevCa, *args: str, env: Mapping[str, str] | None = None) -> Any:
    return hsmscep(ca, "status", *args, env=NO_HSM | dict(env or {}))


@pytest.fixture(scope="module")
def status_ca(softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DevCa:
    return make_ca(
        softhsm_dir, tmp_path_factory.mktemp("status"), "hsmscep-status", "rsa2048", PROFILES
    )


@pytest.fixture(scope="module")
def enrolled(status_ca: DevCa) -> Iterator[Server]:
    """A live server after 3 + 1 certificates (one revoked), one held request and two
    one-time challenges (one used)."""
    server = start_server(status_ca)
    try:
        ca_certs = fetch_ca_certs(server.url)
        serials = []
        for i in range(3):
            request = new_request(ca_certs, status_ca.challenge, cn=f"status-{i}", key_index=i)
            serials.append(issued_cert(post_pki(server.url, request.der), request, ca_certs))
        revoked = hsmscep(status_ca, "revoke", "--serial", f"{serials[0].serial_number:x}")
        assert revoked.returncode == 0, revoked.stderr
        challenges = []
        for _ in range(2):
            issued = hsmscep(status_ca, "challenge", "issue", "--profile", "otp")
            assert issued.returncode == 0, issued.stderr
            challenges.append(issued.stdout.strip())
        request = new_request(ca_certs, challenges[0], cn="status-otp", key_index=3)
        issued_cert(post_pki(f"{server.url}/scep/otp", request.der), request, ca_certs)
        request = new_request(ca_certs, status_ca.challenge, cn="status-held", key_index=4)
        held = open_reply(post_pki(f"{server.url}/scep/manual", request.der), request, ca_certs)
        assert held.pki_status == PENDING
        assert held.pki_status != SUCCESS
        yield server
    finally:
        server.stop()


@pytest.mark.hsm
def test_json_counts_exactly_beside_the_live_server(enrolled: Server, status_ca: DevCa) -> None:
    day = datetime.now(UTC).date()
    done = status(status_ca, "--json", "--days", "1")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    [store] = report["stores"]
    assert (store["backend"], store["location"]) == ("sqlite", str(status_ca.db_path))
    stats = store["stats"]
    assert (stats["total"], stats["revoked"], stats["pending"]) == (4, 1, 1)
    assert stats["challenges_outstanding"] == 1
    assert sum(h["issued"] for h in stats["hourly"]) == 4
    assert len(stats["hourly"]) == 24
    if datetime.now(UTC).date() == day:  # not across midnight UTC
        assert stats["issued_today"] == 4
    assert stats["crl"] is not None and stats["crl"]["number"] >= 1
    ca = x509.load_pem_x509_certificate(status_ca.settings.ca.cert.read_bytes())
    [ca_facts] = [c for c in report["certificates"] if c["role"] == "CA"]
    assert (
        ca_facts["sha256"] == fingerprint(ca) and ca_facts["subject"] == "CN=test CA hsmscep-status"
    )
    assert {p["name"]: p["challenge_mode"] for p in report["profiles"]} == {
        "default": "static", "otp": "one_time", "manual": "static"
    }  # fmt: skip
    assert report["problems"] == [] and report["days"] == 1
    assert status_ca.challenge not in done.stdout


@pytest.mark.hsm
def test_text_report(enrolled: Server, status_ca: DevCa) -> None:
    done = status(status_ca)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("hsmscep ") and "listening on 127.0.0.1:8080" in lines[0]
    assert any(
        line.startswith("CA (default): CN=test CA hsmscep-status; SHA-256 ") for line in lines
    )
    assert "store (default):" in lines and "  requests pending approval: 1" in lines
    assert "  one-time challenges outstanding: 1" in lines
    assert any(
        line.startswith("  certificates: 4 issued, ") and line.endswith(", 1 revoked")
        for line in lines
    )
    assert any(line.startswith("  issued in the last 7 days: 4, busiest hour ") for line in lines)
    assert any(line.startswith("  CRL: number ") for line in lines)


@pytest.mark.hsm
@pytest.mark.parametrize("name", ["issuance.png", "issuance.svg"])
def test_plot_is_a_real_image(
    enrolled: Server, status_ca: DevCa, tmp_path: Path, name: str
) -> None:
    out = tmp_path / name
    done = status(status_ca, "--plot", str(out), "--days", "2")
    assert done.returncode == 0, done.stderr
    data = out.read_bytes()
    if name.endswith(".png"):
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in data[-12:]
    else:
        assert b"<svg" in data[:2000] and data.rstrip().endswith(b"</svg>")
        assert b"Certificates issued per hour" in data or b"issued" in data


def test_plot_without_matplotlib_fails_with_the_install_hint(dev_ca: DevCa, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    out = tmp_path / "x.png"
    env = {"PYTHONPATH": str(blocker.parent)}
    done = status(dev_ca, "--plot", str(out), env=env)
    assert done.returncode == 1
    assert "bench extras" in done.stderr and "requirements/bench.txt" in done.stderr
    assert done.stdout == "" and not out.exists()


def test_bad_arguments_exit_2(dev_ca: DevCa, tmp_path: Path) -> None:
    done = status(dev_ca, "--days", "0")
    assert done.returncode == 2 and "--days must be between 1 and 366" in done.stderr
    done = status(dev_ca, "--plot", str(tmp_path / "x.gif"))
    assert done.returncode == 2 and "must end in .png or .svg" in done.stderr


@pytest.mark.hsm
def test_status_never_writes_the_store(enrolled: Server, status_ca: DevCa, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    with closing(sqlite3.connect(status_ca.db_path)) as src, closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)
    before = copy.read_bytes()
    done = status(status_ca, "--json", env={"HSMSCEP_STORE_PATH": str(copy)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stores"][0]["stats"]["total"] == 4
    assert copy.read_bytes() == before
    missing = tmp_path / "none.db"
    done = status(status_ca, env={"HSMSCEP_STORE_PATH": str(missing)})
    assert done.returncode == 0, done.stderr
    assert "no database yet" in done.stdout and not missing.exists()
    with closing(sqlite3.connect(copy)) as db:
        db.execute("PRAGMA user_version = 99")
    done = status(status_ca, env={"HSMSCEP_STORE_PATH": str(copy)})
    assert done.returncode == 4 and "schema version 99 is newer" in done.stderr


def test_status_on_postgres_counts_exactly(
    dev_ca: DevCa, pg_cluster: Cluster, tmp_path: Path
) -> None:
    pg_cluster.fresh_database("statuscli")
    url = pg_cluster.tcp_url("statuscli")

    async def seed() -> None:
        store = await PgStore.open(url, password=PASSWORD)
        try:
            await fill(store)
        finally:
            await store.close()

    asyncio.run(seed())
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    env = {"HSMSCEP_STORE_URL": url, "HSMSCEP_STORE_PASSWORD_FILE": str(tmp_path / "pw")}
    done = status(dev_ca, "--json", env=env)
    assert done.returncode == 0, done.stderr
    [store] = json.loads(done.stdout)["stores"]
    assert (store["backend"], store["location"]) == ("postgresql", url)
    stats = store["stats"]
    # The seeded data is from May 2026: nothing today, its challenges long expired.
    assert (stats["total"], stats["revoked"], stats["pending"]) == (7, 2, 2)
    assert (stats["issued_today"], stats["challenges_outstanding"]) == (0, 0)
    assert stats["crl"]["number"] == 2
    assert PASSWORD not in done.stdout + done.stderr


@pytest.mark.hsm
def test_every_ca_has_its_own_counts(enrolled: Server, status_ca: DevCa) -> None:
    directory = status_ca.directory
    for role in ("ca", "ra"):
        (directory / f"second-{role}.pem").write_bytes((directory / f"{role}.pem").read_bytes())
    config = directory / "multi.toml"
    extra = '\n[cas.second]\nkey_label = "second-ca"\nra_key_label = "second-ra"\n'
    config.write_text(status_ca.config.read_text() + extra)

    async def seed() -> None:
        store = await CertStore.open(directory / "second.db")
        try:
            await fill(store)
        finally:
            await store.close()

    asyncio.run(seed())
    done = subprocess.run(
        [sys.executable, "-m", "hsmscep", "status", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ) | NO_HSM,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    totals = {s["ca"]: (s["location"], s["stats"]["total"]) for s in report["stores"]}
    assert totals == {
        "default": (str(status_ca.db_path), 4),
        "second": (str(directory / "second.db"), 7),
    }
    assert [p[0] for p in report["publication"]] == ["default", "second"]
