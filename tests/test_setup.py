"""`hsmscep init` and `import-ca`, and the HSM layouts they support, end to end."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.cli.bootstrap import InitOptions, init
from hsmscep.config.settings import load_settings
from hsmscep.errors import ConfigError
from hsmscep.hsm import devtoken
from hsmscep.testing import client
from tests.conftest import DevCa, make_ca, start_server

pytestmark = pytest.mark.hsm


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmscep", *args], capture_output=True, text=True, timeout=120
    )


def enroll(url: str, ca: DevCa, cn: str) -> client.CertRepResult:
    with urllib.request.urlopen(f"{url}/scep?operation=GetCACert") as r:
        ca_certs = client.parse_ca_certs(r.read())
    key = rsa.generate_private_key(65537, 2048)
    request = client.build_pkcs_req(
        key=key,
        ca_certs=ca_certs,
        challenge=ca.challenge,
        subject=x509.Name.from_rfc4514_string(f"CN={cn}"),
    )
    post = urllib.request.Request(
        f"{url}/scep?operation=PKIOperation", data=request.der, method="POST"
    )
    with urllib.request.urlopen(post) as r:
        result = client.open_cert_rep(r.read(), request, ca_certs)
    assert result.pki_status == "0", result
    assert result.certificates[0].public_key() == key.public_key()
    return result


def test_init_refuses_to_replace_existing_keys(dev_ca: DevCa) -> None:
    before = dev_ca.settings.ca.cert.read_bytes()
    result = cli("init", "--config", str(dev_ca.config))
    assert result.returncode == 2
    assert "already exist" in result.stderr and "--force" in result.stderr
    assert dev_ca.settings.ca.cert.read_bytes() == before


def test_ec_p256_ca_issues_ecdsa_signed_certificates(softhsm_dir: Path, tmp_path: Path) -> None:
    ca = make_ca(softhsm_dir, tmp_path, "ec-ca", ca_key="p256")
    ca_cert = x509.load_pem_x509_certificate(ca.settings.ca.cert.read_bytes())
    assert isinstance(ca_cert.public_key(), ec.EllipticCurvePublicKey)
    srv = start_server(ca)
    try:
        issued = enroll(srv.url, ca, "ec-issued").certificates[0]
    finally:
        srv.stop()
    public_key = ca_cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(issued.signature, issued.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    assert issued.issuer == ca_cert.subject


def test_split_ra_keys_on_two_tokens(softhsm_dir: Path, tmp_path: Path) -> None:
    """FIPS layout: RA signing key with the CA, RA decryption key on another token."""
    devtoken.ensure_token(softhsm_dir, label="decrypt-partition")
    extra = """
[ra_decrypt]
token_label = "decrypt-partition"
pin_file = "pin"
key_label = "hsmscep-ra-decrypt"
cert = "ra-decrypt.pem"
"""
    ca = make_ca(softhsm_dir, tmp_path, "split-ca", extra_config=extra)
    assert ca.settings.ra_split
    assert ca.settings.ra_decrypt.key.token.label == "decrypt-partition"
    sign_cert = x509.load_pem_x509_certificate(ca.settings.ra.cert.read_bytes())
    decrypt_cert = x509.load_pem_x509_certificate(ca.settings.ra_decrypt.cert.read_bytes())
    sign_ku = sign_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    decrypt_ku = decrypt_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert sign_ku.digital_signature and not sign_ku.key_encipherment
    assert decrypt_ku.key_encipherment and not decrypt_ku.digital_signature

    srv = start_server(ca)
    try:
        with urllib.request.urlopen(f"{srv.url}/scep?operation=GetCACert") as r:
            served = client.parse_ca_certs(r.read())
        result = enroll(srv.url, ca, "split-issued")
    finally:
        srv.stop()
    assert {c.public_bytes(Encoding.DER) for c in served} >= {
        sign_cert.public_bytes(Encoding.DER),
        decrypt_cert.public_bytes(Encoding.DER),
    }
    assert client.select_recipient(served) == decrypt_cert
    assert result.signer_cert == sign_cert  # the CertRep is signed by the signing RA key


def test_external_root_via_csr_and_import(softhsm_dir: Path, tmp_path: Path) -> None:
    token = devtoken.ensure_token(softhsm_dir, label="offline-root")
    (tmp_path / "pin").write_text(token.pin_file.read_text())
    (tmp_path / "challenge").write_text("offline\n")
    from hsmscep.cli.dev import dev_config

    config = tmp_path / "hsmscep.toml"
    config.write_text(
        dev_config(token.module, "offline-root", "pin", "challenge") + "\n[ca_chain]\n"
    )
    # an unknown section is a configuration error that names it
    with pytest.raises(ConfigError, match=r"\[ca_chain\]"):
        load_settings(config)
    config.write_text(
        dev_config(token.module, "offline-root", "pin", "challenge").replace(
            'cert = "ca.pem"', 'cert = "ca.pem"\nchain = "chain.pem"'
        )
    )
    settings = load_settings(config)
    csr_path = tmp_path / "ca.csr"
    done = init(settings, InitOptions(subject="CN=Issuing CA", csr_out=csr_path))
    assert any("CSR" in line for line in done)
    assert not settings.ca.cert.exists()
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid

    # The offline root signs the CSR (a software key here: it is not ours to hold).
    root_key = rsa.generate_private_key(65537, 3072)
    root_name = x509.Name.from_rfc4514_string("CN=Offline Root")
    now = datetime.now(UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    issuing = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(root_name)
        .public_key(csr.public_key())
        .serial_number(2)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    (tmp_path / "issuing.pem").write_bytes(issuing.public_bytes(Encoding.PEM))
    (tmp_path / "root.pem").write_bytes(root.public_bytes(Encoding.PEM))
    (tmp_path / "wrong.pem").write_bytes(root.public_bytes(Encoding.PEM))

    wrong = cli("import-ca", "--config", str(config), "--cert", str(tmp_path / "wrong.pem"))
    assert wrong.returncode == 2 and "does not certify the CA key" in wrong.stderr
    imported = cli(
        "import-ca",
        "--config", str(config),
        "--cert", str(tmp_path / "issuing.pem"),
        "--chain", str(tmp_path / "root.pem"),
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert settings.ca.cert.read_bytes() == issuing.public_bytes(Encoding.PEM)

    ca = DevCa(tmp_path, config, settings, "offline", token)
    srv = start_server(ca)
    try:
        with urllib.request.urlopen(f"{srv.url}/scep?operation=GetCACert") as r:
            served = client.parse_ca_certs(r.read())
        issued = enroll(srv.url, ca, "chained").certificates[0]
    finally:
        srv.stop()
    assert root in served and issuing in served
    issuing_key = issuing.public_key()
    assert isinstance(issuing_key, rsa.RSAPublicKey)
    issuing_key.verify(
        issued.signature, issued.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256()
    )
