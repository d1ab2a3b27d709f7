"""The start-up banner: logged once by a real `hsmscep serve` with the facts an operator
checks (version, address, sizes, token, certificates with fingerprints and expiry, store,
profiles and endpoints), never a PIN; a WARNING for a CA expiring within 30 days; and the
pure facts and lines for cases a live server cannot easily show."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hsmscep import __version__
from hsmscep.cli.banner import fingerprint, gather, load_certificates, render
from hsmscep.cli.bootstrap import InitOptions, init
from hsmscep.cli.dev import dev_config
from hsmscep.config.settings import load_settings
from hsmscep.hsm import devtoken
from tests.conftest import DevCa, Server, software_root, start_server

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def banner_lines(server: Server) -> list[str]:
    return [line for line in server.output().splitlines() if " hsmscep.cli.banner " in line]


@pytest.mark.hsm
def test_serve_logs_the_banner_once_before_the_workers(server: Server, dev_ca: DevCa) -> None:
    lines = banner_lines(server)
    text = "\n".join(lines)
    port = server.url.rsplit(":", 1)[1]
    assert sum(f"hsmscep {__version__}: listening on 127.0.0.1:{port}" in x for x in lines) == 1
    s = dev_ca.settings
    for role, path in (("CA", s.ca.cert), ("RA", s.ra.cert)):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        expected = (
            f"{role} (default): {cert.subject.rfc4514_string()}; SHA-256 {fingerprint(cert)};"
            f" notAfter {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
        )
        assert expected in text
    assert fingerprint(cert).count(":") == 31
    assert f"token: label 'hsmscep-test' ({dev_ca.token.module})" in text
    assert "1 worker process, " in text and "max_pending 128" in text
    assert f"store (default): sqlite {dev_ca.db_path}" in text
    assert "profile default (CA default): /scep, /cgi-bin/pkiclient.exe; challenge static" in text
    assert "CA default publishes /ca.crt and /crl/ca.crl" in text
    assert not [x for x in lines if " WARNING " in x or " ERROR " in x]
    pin = (dev_ca.directory / "pin").read_text().strip()
    assert pin not in server.output() and dev_ca.challenge not in server.output()
    # Logged by the supervisor before any worker process exists.
    output = server.output()
    assert output.index("listening on") < output.index("Started server process")


@pytest.fixture(scope="module")
def short_lived_ca(softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DevCa:
    """A CA whose certificate (and so its RA's) expires in 10 days."""
    token = devtoken.ensure_token(softhsm_dir, label="hsmscep-short")
    directory = tmp_path_factory.mktemp("short")
    shutil.copy(token.pin_file, directory / "pin")
    (directory / "challenge").write_text("secret-short\n")
    config = directory / "hsmscep.toml"
    config.write_text(dev_config(token.module, token.label, "pin", "challenge"))
    settings = load_settings(config)
    init(settings, InitOptions(subject="CN=short CA", validity_days=10))
    return DevCa(directory, config, settings, "secret-short", token)


@pytest.fixture(scope="module")
def short_lived_server(short_lived_ca: DevCa) -> Iterator[Server]:
    srv = start_server(short_lived_ca)
    yield srv
    srv.stop()


@pytest.mark.hsm
def test_a_ca_expiring_within_30_days_is_a_warning(short_lived_server: Server) -> None:
    warnings = [x for x in banner_lines(short_lived_server) if " WARNING " in x]
    assert len(warnings) == 2, warnings  # the CA and its RA (capped at the CA's notAfter)
    assert "CA certificate of CA default (CN=short CA" in warnings[0]
    assert "RA certificate of CA default" in warnings[1]
    assert all("expires in 9." in x or "expires in 10.0 days" in x for x in warnings), warnings


# ---- the pure facts ------------------------------------------------------------------------


def write_cert(path: Path, cn: str, not_before: datetime, not_after: datetime) -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    base = software_root(key, name, not_before + timedelta(days=1))
    cert = (
        x509.CertificateBuilder(
            issuer_name=name,
            subject_name=name,
            public_key=key.public_key(),
            serial_number=base.serial_number,
            not_valid_before=not_before,
            not_valid_after=not_after,
            extensions=base.extensions,
        )
    ).sign(key, base.signature_hash_algorithm)
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    return cert


CONFIG = """
[server]
port = 8443
host = "0.0.0.0"
workers = "auto"
pool_size = 8
[pkcs11]
module = "/opt/luna/libCryptoki2_64.so"
token_label = "scep-ca"
pin_env = "BANNER_TEST_PIN"
[pkcs11.replicas.b]
token_label = "scep-ca-b"
pin_env = "BANNER_TEST_PIN"
[ca]
key_label = "ca"
[ra]
key_label = "ra"
[enroll]
challenge_mode = "none"
[store]
url = "postgresql://hsmscep@db.example.com/pki"
[profiles.wifi]
challenge_mode = "one_time"
approval = "manual"
ms_template = "WiFi"
ca = "devices"
[cas.devices]
key_label = "dev-ca"
ra_key_label = "dev-ra"
"""


def test_facts_and_lines_of_a_production_like_config(tmp_path: Path) -> None:
    (tmp_path / "hsmscep.toml").write_text(CONFIG)
    write_cert(tmp_path / "ca.pem", "Root", NOW - timedelta(days=100), NOW + timedelta(days=900))
    write_cert(tmp_path / "ra.pem", "RA", NOW - timedelta(days=1), NOW + timedelta(days=20))
    write_cert(tmp_path / "devices-ca.pem", "Dev", NOW + timedelta(hours=2), NOW + timedelta(400))
    write_cert(tmp_path / "devices-ra.pem", "Dev RA", NOW - timedelta(400), NOW - timedelta(1))
    settings = load_settings(tmp_path / "hsmscep.toml", {"BANNER_TEST_PIN": "0000-secret"})
    facts = gather(settings, load_certificates(settings), cpus=4, now=NOW)
    assert (facts.workers, facts.workers_auto, facts.pool_size, facts.pool_auto) == (
        4,
        True,
        8,
        False,
    )
    assert facts.tokens == (
        "label 'scep-ca' (/opt/luna/libCryptoki2_64.so)",
        "label 'scep-ca-b' (/opt/luna/libCryptoki2_64.so)",
    )
    assert [(s.ca, s.backend, s.location) for s in facts.stores] == [
        ("default", "postgresql", "postgresql://hsmscep@db.example.com/pki"),
        ("devices", "sqlite", str(tmp_path / "devices.db")),
    ]
    wifi = [p for p in facts.profiles if p.name == "wifi"][0]
    assert (wifi.endpoints, wifi.challenge_mode, wifi.approval, wifi.ca) == (
        ("/scep/wifi",), "one_time", "manual", "devices"
    )  # fmt: skip
    lines = render(facts)
    text = "\n".join(line for _, line in lines)
    assert "0000-secret" not in text
    assert "hsmscep " + __version__ + ": listening on 0.0.0.0:8443" in text
    assert "4 worker processes (auto: one per CPU), 8 signing threads each, max_pending" in text
    assert "profile wifi (CA devices): /scep/wifi, or a CSR naming template 'WiFi';" in text
    assert "CA devices publishes /ca/devices.crt and /crl/devices.crl" in text
    problems = [(level, line) for level, line in lines if level > logging.INFO]
    assert [level for level, _ in problems] == [logging.WARNING, logging.WARNING, logging.ERROR]
    assert "RA certificate of CA default (CN=RA" in problems[0][1]
    assert "expires in 20.0 days" in problems[0][1]
    assert "CA certificate of CA devices (CN=Dev" in problems[1][1]
    assert "is not valid before" in problems[1][1]
    assert "RA certificate of CA devices (CN=Dev RA" in problems[2][1]
    assert "EXPIRED on" in problems[2][1]
    # 31 days left: no expiry warning (but eleven days earlier the RA was not valid yet).
    earlier = gather(settings, load_certificates(settings), cpus=4, now=NOW - timedelta(days=11))
    ra = [line for level, line in render(earlier) if level > logging.INFO and "CN=RA," in line]
    assert len(ra) == 1 and "is not valid before" in ra[0], ra
