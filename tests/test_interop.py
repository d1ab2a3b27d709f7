"""Real clients against a real server: micromdm's scepclient (Debian package `scep`)."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.conftest import DevCa, Server, start_server

pytestmark = pytest.mark.interop

SCEPCLIENT = shutil.which("scepclient")


def enroll_with_scepclient(
    url: str, challenge: str, workdir: Path, cn: str
) -> subprocess.CompletedProcess[str]:
    if SCEPCLIENT is None:
        pytest.skip("scepclient not installed (apt-get install scep)")
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [
            SCEPCLIENT,
            "-server-url", f"{url}/scep",
            "-challenge", challenge,
            "-private-key", str(workdir / "client.key"),
            "-certificate", str(workdir / "client.pem"),
            "-cn", cn,
        ],
        cwd=workdir,  # scepclient writes self.pem and csr.pem into the working directory
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def stored_serials(ca: DevCa) -> set[int]:
    with sqlite3.connect(ca.settings.store.path) as db:
        return {int(row[0], 16) for row in db.execute("SELECT serial FROM certificates")}


def check_issued(ca: DevCa, workdir: Path, cn: str) -> x509.Certificate:
    pem = workdir / "client.pem"
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca.settings.ca.cert), str(pem)],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == cn
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.serial_number in stored_serials(ca)
    return cert


def test_scepclient_enrolls_over_post(dev_ca: DevCa, server: Server, tmp_path: Path) -> None:
    result = enroll_with_scepclient(server.url, dev_ca.challenge, tmp_path, "post-client")
    assert result.returncode == 0, result.stdout + result.stderr
    check_issued(dev_ca, tmp_path, "post-client")


def test_scepclient_enrolls_over_get_when_post_not_advertised(
    dev_ca: DevCa, tmp_path: Path
) -> None:
    caps = "SHA-1,SHA-256,SHA-512,AES,DES3,SCEPStandard"
    srv = start_server(dev_ca, {"HSMSCEP_SERVER_CAPS": caps})
    try:
        with urllib.request.urlopen(f"{srv.url}/scep?operation=GetCACaps") as r:
            advertised = r.read().decode().split()
        result = enroll_with_scepclient(srv.url, dev_ca.challenge, tmp_path, "get-client")
    finally:
        srv.stop()
    # Without POSTPKIOperation in GetCACaps, scepclient can only send its request by GET.
    assert "POSTPKIOperation" not in advertised and "AES" in advertised
    assert result.returncode == 0, result.stdout + result.stderr
    check_issued(dev_ca, tmp_path, "get-client")


def test_scepclient_wrong_challenge_gets_failure(
    dev_ca: DevCa, server: Server, tmp_path: Path
) -> None:
    before = stored_serials(dev_ca)
    result = enroll_with_scepclient(server.url, "not-the-challenge", tmp_path, "bad-client")
    assert result.returncode != 0
    assert "badRequest" in result.stdout + result.stderr
    assert stored_serials(dev_ca) == before
    assert not (tmp_path / "client.pem").exists()
