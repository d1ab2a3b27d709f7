"""Revocation over the admin API: POST /admin/certificates/{serial}/revoke, in process.

The real app and store with software keys (tests/inprocess.py). The same store write and CRL
path as `hsmscep revoke`; the HTTP CRL is checked with cryptography and `openssl crl -verify`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from hsmscep.testing import client
from tests.conftest import openssl_serial
from tests.inprocess import SoftCa, serve, soft_ca
from tests.test_revocation import crl_number, enroll, http_crl, openssl_crl, reason_of

TOKEN = "revoke-admin-token-0123456789"


@pytest.fixture(scope="module")
def aca(tmp_path_factory: pytest.TempPathFactory) -> SoftCa:
    directory = tmp_path_factory.mktemp("admin-revoke")
    (directory / "admin-token").write_text(TOKEN + "\n")
    return soft_ca(
        directory, "admin-revoke-ca", extra_config='\n[admin]\ntoken_file = "admin-token"\n'
    )


@pytest.fixture(scope="module")
def aserver(aca: SoftCa) -> Iterator[httpx.Client]:
    with serve(aca) as http:
        yield http


@pytest.fixture(autouse=True)
def token_never_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    yield
    assert TOKEN not in caplog.text


@pytest.fixture(scope="module")
def certs(aserver: httpx.Client) -> list[x509.Certificate]:
    response = aserver.get("/scep", params={"operation": "GetCACert"})
    return client.parse_ca_certs(response.content)


def revoke(
    http: httpx.Client,
    serial: str,
    body: Any = None,
    token: str | None = TOKEN,
    method: str = "POST",
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    content = json.dumps(body).encode() if body is not None else b""
    return http.request(
        method,
        f"/admin/certificates/{serial}/revoke",
        content=content,
        headers=headers | {"Content-Type": "application/json"},
    )


def test_admin_revocation_reaches_the_crl(
    aca: SoftCa, aserver: httpx.Client, certs: list[x509.Certificate], tmp_path: Path
) -> None:
    cert, _ = enroll(aserver, aca, certs, "admin-revoked")
    _, before = http_crl(aserver)
    assert before.get_revoked_certificate_by_serial_number(cert.serial_number) is None

    done = revoke(aserver, f"{cert.serial_number:x}", {"reason": "keyCompromise"})
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["serial"] == openssl_serial(cert)
    assert (body["reason"], body["outcome"], body["changed"]) == (
        "keyCompromise",
        "revoked",
        True,
    )

    der, after = http_crl(aserver)
    assert crl_number(after) > crl_number(before)
    assert reason_of(after, cert.serial_number) == x509.ReasonFlags.key_compromise
    assert after.is_signature_valid(certs[0].public_key())  # type: ignore[arg-type]
    verified = openssl_crl(der, tmp_path, "-CAfile", str(aca.ca_cert), "-verify")
    assert verified.returncode == 0 and "verify OK" in verified.stderr, verified

    # Idempotent: a repeat (another reason, upper-case colon serial) changes nothing.
    serial_hex = f"{cert.serial_number:X}"
    colons = ":".join(serial_hex[i : i + 2] for i in range(0, len(serial_hex), 2))
    again = revoke(aserver, colons, {"reason": "superseded"})
    assert again.status_code == 200, again.text
    assert (again.json()["reason"], again.json()["changed"]) == ("keyCompromise", False)
    assert again.json()["revoked_at"] == body["revoked_at"]
    _, same = http_crl(aserver)
    assert crl_number(same) == crl_number(after)
    assert reason_of(same, cert.serial_number) == x509.ReasonFlags.key_compromise

    # The CLI sees the same revocation.
    cli = subprocess.run(
        [sys.executable, "-m", "hsmscep", "revoke", "--config", str(aca.config)]
        + ["--serial", f"{cert.serial_number:x}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0 and "already revoked (keyCompromise)" in cli.stdout, cli


def test_default_reason_is_unspecified(
    aca: SoftCa, aserver: httpx.Client, certs: list[x509.Certificate]
) -> None:
    cert, _ = enroll(aserver, aca, certs, "admin-unspecified")
    done = revoke(aserver, f"{cert.serial_number:x}")
    assert done.status_code == 200, done.text
    assert done.json()["reason"] == "unspecified"
    _, crl = http_crl(aserver)
    assert reason_of(crl, cert.serial_number) is None


@pytest.mark.parametrize(
    ("serial", "body", "status"),
    [
        ("7fffffffffffffff01", {"reason": "keyCompromise"}, 404),  # never issued
        ("not-hex", {"reason": "keyCompromise"}, 404),
        ("00", {"reason": "keyCompromise"}, 404),
        (None, {"reason": "stolen"}, 400),
        (None, {"reason": "removeFromCRL"}, 400),
        (None, {"reason": 1}, 400),
        (None, ["keyCompromise"], 400),
    ],
)
def test_refusals(
    aca: SoftCa,
    aserver: httpx.Client,
    certs: list[x509.Certificate],
    serial: str | None,
    body: Any,
    status: int,
) -> None:
    if serial is None:
        cert, _ = enroll(aserver, aca, certs, "admin-refused")
        serial = f"{cert.serial_number:x}"
    response = revoke(aserver, serial, body)
    assert response.status_code == status, response.text
    if status == 400:
        _, crl = http_crl(aserver)
        assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is None


def test_not_json_is_400(aca: SoftCa, aserver: httpx.Client, certs: list[x509.Certificate]) -> None:
    cert, _ = enroll(aserver, aca, certs, "admin-not-json")
    response = aserver.post(
        f"/admin/certificates/{cert.serial_number:x}/revoke",
        content=b"{reason",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 400


def test_token_and_method(aserver: httpx.Client) -> None:
    assert revoke(aserver, "01", token=None).status_code == 401
    assert revoke(aserver, "01", token="wrong-token-0123456789").status_code == 401
    assert revoke(aserver, "01", method="GET").status_code == 405


def test_disabled_without_token(tmp_path: Path) -> None:
    with serve(soft_ca(tmp_path, "no-admin-ca")) as http:
        assert revoke(http, "01", {"reason": "keyCompromise"}).status_code == 404


def test_store_failure_is_503_without_internal_text(tmp_path: Path) -> None:
    (tmp_path / "admin-token").write_text(TOKEN + "\n")
    ca = soft_ca(
        tmp_path, "broken-store-ca", extra_config='\n[admin]\ntoken_file = "admin-token"\n'
    )
    with serve(ca) as http:
        certs = client.parse_ca_certs(http.get("/scep?operation=GetCACert").content)
        cert, _ = enroll(http, ca, certs, "store-gone")
        # Break the real database under the running server: the store raises StoreError.
        with sqlite3.connect(tmp_path / "hsmscep.db") as db:
            db.execute("DROP TABLE certificates")
        response = revoke(http, f"{cert.serial_number:x}", {"reason": "keyCompromise"})
    assert response.status_code == 503, response.text
    assert response.text == "temporarily unavailable\n"
    assert response.headers["retry-after"] == "1"
