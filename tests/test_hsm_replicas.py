"""Several HSMs holding the same keys ([pkcs11.replicas.<name>]): two SoftHSM2 tokens with the
same imported keys, one of them removed mid-load (every call answers CKR_DEVICE_REMOVED, via
the pass-through module), then put back: no enrollment fails, and it is probed back in.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute, KeyType, ObjectClass

from hsmscep.cli.dev import dev_config
from hsmscep.config.settings import load_settings
from hsmscep.hsm import devtoken
from hsmscep.hsm.library import open_library
from tests.conftest import DevCa, start_server
from tests.hsmfaults import Load, build_shim, private_module, stored_serials

pytestmark = pytest.mark.hsm


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory)


def import_key(token: devtoken.DevToken, label: str, key: rsa.RSAPrivateKey) -> None:
    """Test only: production keys are generated in the HSM and never leave it."""
    numbers = key.private_numbers()
    lib = open_library(token.module)
    found = next(t for t in lib.get_tokens() if t.label == token.label)

    def raw(n: int) -> bytes:
        return n.to_bytes((n.bit_length() + 7) // 8, "big")

    with found.open(rw=True, user_pin=token.pin_file.read_text().strip()) as session:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                Attribute.KEY_TYPE: KeyType.RSA,
                Attribute.LABEL: label,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.SIGN: True,
                Attribute.DECRYPT: True,
                Attribute.MODULUS: raw(numbers.public_numbers.n),
                Attribute.PUBLIC_EXPONENT: raw(numbers.public_numbers.e),
                Attribute.PRIVATE_EXPONENT: raw(numbers.d),
                Attribute.PRIME_1: raw(numbers.p),
                Attribute.PRIME_2: raw(numbers.q),
                Attribute.EXPONENT_1: raw(numbers.dmp1),
                Attribute.EXPONENT_2: raw(numbers.dmq1),
                Attribute.COEFFICIENT: raw(numbers.iqmp),
            }
        )


def certificate_like(
    model: x509.Certificate, key: rsa.RSAPrivateKey, issuer: x509.Name, signer: rsa.RSAPrivateKey
) -> x509.Certificate:
    """`model`'s subject and extensions on `key`, signed by `signer`."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(model.subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
    )
    for ext in model.extensions:
        if ext.oid in (
            x509.SubjectKeyIdentifier.oid,
            x509.AuthorityKeyIdentifier.oid,
        ):
            continue
        builder = builder.add_extension(ext.value, ext.critical)
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    )
    return builder.sign(signer, hashes.SHA256())


def test_a_replica_taken_out_mid_load_fails_no_enrollment(
    dev_ca: DevCa, softhsm_dir: Path, shim: Path, tmp_path: Path
) -> None:
    tokens = [devtoken.ensure_token(softhsm_dir, label=f"hsmscep-ha-{n}") for n in "ab"]
    ca_key, ra_key = (rsa.generate_private_key(65537, 2048) for _ in range(2))
    for token in tokens:
        import_key(token, "hsmscep-ca", ca_key)
        import_key(token, "hsmscep-ra", ra_key)
    model_ca = x509.load_pem_x509_certificate(dev_ca.settings.ca.cert.read_bytes())
    model_ra = x509.load_pem_x509_certificate(dev_ca.settings.ra.cert.read_bytes())
    ca_cert = certificate_like(model_ca, ca_key, model_ca.subject, ca_key)
    ra_cert = certificate_like(model_ra, ra_key, ca_cert.subject, ca_key)
    directory = tmp_path / "ha"
    directory.mkdir()
    for name, cert in (("ca.pem", ca_cert), ("ra.pem", ra_cert)):
        (directory / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "pin").write_text(tokens[0].pin_file.read_text())
    (directory / "challenge").write_text("secret-ha\n")
    # Token a through the pass-through module (over a private copy of SoftHSM2, so that
    # re-initialising it leaves token b's module alone); token b directly.
    shim_a = private_module(shim, tmp_path, "shim-a.so")
    softhsm_a = private_module(tokens[0].module, tmp_path, "softhsm-a.so")
    config = directory / "hsmscep.toml"
    config.write_text(
        dev_config(shim_a, "hsmscep-ha-a", "pin", "challenge")
        + f'\n[pkcs11.replicas.b]\nmodule = "{tokens[1].module}"\n'
        + 'token_label = "hsmscep-ha-b"\npin_file = "pin"\n'
    )
    fault = tmp_path / "fault"
    env = {"P11SHIM_MODULE": softhsm_a, "P11SHIM_FAULT": str(fault)}
    ca = DevCa(directory, config, load_settings(config), "secret-ha", tokens[0])
    server = start_server(ca, env, args=("--workers", "1", "--pool-size", "4"))
    load = Load(server.url, ca.challenge, threads=4)
    try:
        load.start()
        assert load.wait_for(lambda: load.successes_since(0) >= 8, 60), server.output()
        fault.write_text("32\n")  # CKR_DEVICE_REMOVED
        removed_at = time.monotonic()
        assert load.wait_for(lambda: load.successes_since(removed_at) >= 20, 30)
        fault.unlink()
        assert load.wait_for(lambda: "is back after" in server.output(), 30), server.output()
        back_at = time.monotonic()
        assert load.wait_for(lambda: load.successes_since(back_at) >= 8, 30)
    finally:
        load.stop()
        server.stop()
    output = server.output()
    failed = [o for o in load.outcomes if o.status != 200 or o.pki_status != "0"]
    assert not failed, (failed[:5], output)
    assert output.count("is unavailable") == 1, output
    assert output.count("is back after") == 1, output
    issued = {o.serial for o in load.outcomes if o.serial is not None}
    assert len(issued) == len(load.outcomes)
    assert issued <= stored_serials(directory / "hsmscep.db")
    assert "Traceback" not in output
    assert os.path.exists(softhsm_a)
