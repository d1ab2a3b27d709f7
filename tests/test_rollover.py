"""CA rollover end to end: `hsmscep rollover prepare|activate`, GetNextCACert, GetCACaps, and
enrollment across the switch, against live servers, a SoftHSM2 token and SQLite.

The commands run in their own processes, as an operator runs them; servers pick the change
up on restart. A request encrypted to the old RA certificate before activation is sent after
it and must still decrypt (the old RA key stays a decryption key).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.config.settings import load_settings
from hsmscep.errors import ConfigError, MessageError
from hsmscep.hsm.login import TokenLogin
from hsmscep.hsm.tokenkeys import key_protection
from hsmscep.testing import client
from tests.conftest import DevCa, Server, make_ca, start_server
from tests.test_interop import check_issued, enroll_with_scepclient
from tests.test_revocation import enroll, post

pytestmark = pytest.mark.hsm

TIMEOUT = 30.0
SUCCESS = "0"


def rollover(ca: DevCa, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmscep", "rollover", *args, "--config", str(ca.config)],
        capture_output=True,
        text=True,
        timeout=180,
    )


def get(url: str, operation: str) -> httpx.Response:
    return httpx.get(f"{url}/scep", params={"operation": operation}, timeout=TIMEOUT)


def caps(url: str) -> list[str]:
    return get(url, "GetCACaps").text.split()


def ca_certs(url: str) -> list[x509.Certificate]:
    return client.parse_ca_certs(get(url, "GetCACert").content)


def openssl_verify(
    ca_pem: Path, cert: x509.Certificate, tmp_path: Path, untrusted: Path | None = None
) -> bool:
    path = tmp_path / f"{cert.serial_number:x}.pem"
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    extra = ["-untrusted", str(untrusted)] if untrusted is not None else []
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_pem), *extra, str(path)],
        capture_output=True,
        text=True,
    )
    return done.returncode == 0 and ": OK" in done.stdout


def check_new_with_old(
    cross: x509.Certificate, new_ca: x509.Certificate, old_ca: x509.Certificate
) -> None:
    """`cross` certifies `new_ca`'s subject and key, signed by the `old_ca` key."""
    cross.verify_directly_issued_by(old_ca)  # the old CA's key signed it
    with pytest.raises((InvalidSignature, ValueError)):
        cross.verify_directly_issued_by(new_ca)  # not self-signed by the new key
    assert cross.public_key() == new_ca.public_key() != old_ca.public_key()
    assert cross.subject == new_ca.subject and cross.issuer == old_ca.subject
    assert cross != new_ca and cross.serial_number != new_ca.serial_number
    constraints = cross.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value == x509.BasicConstraints(True, 0)
    usage = cross.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.key_encipherment
    ski = cross.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == new_ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cross.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    old_ski = old_ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == old_ski.digest
    assert cross.not_valid_after_utc <= old_ca.not_valid_after_utc
    assert cross.not_valid_before_utc <= datetime.now(UTC)


def cross_cert(url: str) -> x509.Certificate:
    response = httpx.get(f"{url}/ca-cross.crt", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/pkix-cert"
    return x509.load_der_x509_certificate(response.content)


def select_ca_and_ra(
    certs: list[x509.Certificate], ca: x509.Certificate, ra: x509.Certificate
) -> None:
    """How clients pick the CA and RA out of GetCACert; each must land on `ca` and `ra`."""

    def usage(cert: x509.Certificate) -> x509.KeyUsage:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value

    # Apple/Windows: the RA by key usage (encrypt to keyEncipherment, verify digitalSignature),
    # then the CA as the certificate that issued it.
    leaves = [c for c in certs if not usage(c).key_cert_sign]
    assert [c for c in leaves if usage(c).key_encipherment] == [ra]
    assert [c for c in leaves if usage(c).digital_signature] == [ra]
    issuers = [c for c in certs if c.subject == ra.issuer and usage(c).key_cert_sign]
    assert issuers == [ca]
    ra.verify_directly_issued_by(ca)
    # sscep-style: the first certificate is the CA, and it is self-signed.
    assert certs[0] == ca and ca.issuer == ca.subject
    # certmonger (and OpenSSL name-based building): from the RA, follow issuer names to a
    # certificate whose subject equals its issuer; exactly one candidate at each step.
    tops = [c for c in certs if c.subject == ca.subject]
    assert tops == [ca]


def restart(ca: DevCa, srv: Server) -> Server:
    srv.stop()
    assert "Traceback" not in srv.output()
    return start_server(ca)


def test_rollover_end_to_end(softhsm_dir: Path, tmp_path: Path) -> None:
    ca = make_ca(softhsm_dir, tmp_path / "ca", "rollover-ca")
    old_ca_pem = ca.settings.ca.cert
    srv = start_server(ca)
    try:
        assert "GetNextCACert" not in caps(srv.url)
        assert get(srv.url, "GetNextCACert").status_code == 404
        old = ca_certs(srv.url)
        old_ca, old_ra = old[0], old[1]
        select_ca_and_ra(old, old_ca, old_ra)
        assert httpx.get(f"{srv.url}/ca-cross.crt", timeout=TIMEOUT).status_code == 404

        # ---- prepare: next keys in the HSM, a new root and RA certificate --------------
        done = rollover(ca, "prepare")
        assert done.returncode == 0, done.stderr
        state = json.loads((ca.directory / "rollover.json").read_text())
        assert state["next"] == {
            "ca_key_label": "hsmscep-ca-g2",
            "ca_cert": "ca-g2.pem",
            "ra_key_label": "hsmscep-ra-g2",
            "ra_cert": "ra-g2.pem",
            "cross_cert": "cross-g2.pem",
        }
        prepared = load_settings(ca.config)
        assert prepared.rollover.next is not None
        logins = TokenLogin()
        try:
            for ref in (prepared.rollover.next.ca_key, prepared.rollover.next.ra_key):
                session = logins.open_session(ref.token)
                assert key_protection(session, ref) == (True, False), ref.describe()
        finally:
            logins.close()
        again = rollover(ca, "prepare")
        assert again.returncode == 2 and "already prepared" in again.stderr, again

        # The running server still serves the current CA until it restarts.
        assert "GetNextCACert" not in caps(srv.url)
        srv = restart(ca, srv)
        assert "GetNextCACert" in caps(srv.url)
        during = ca_certs(srv.url)
        assert during == [old_ca, old_ra]  # GetCACert is unchanged until activation
        select_ca_and_ra(during, old_ca, old_ra)
        # micromdm's scepclient enrolls under the current CA while the next one is prepared.
        work = tmp_path / "scepclient-during"
        run = enroll_with_scepclient(srv.url, ca.challenge, work, "scepclient-during")
        assert run.returncode == 0, run.stdout + run.stderr
        check_issued(ca, work, "scepclient-during")

        # ---- GetNextCACert: signed by the current RA key, the next CA inside -----------
        response = get(srv.url, "GetNextCACert")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-x509-next-ca-cert"
        next_ca, next_ra, cross = client.parse_next_ca_certs(response.content, [old_ra])
        with pytest.raises(MessageError):
            client.parse_next_ca_certs(response.content, [next_ra])  # not signed by the next RA
        on_disk = x509.load_pem_x509_certificate((ca.directory / "ca-g2.pem").read_bytes())
        assert next_ca == on_disk and next_ca != old_ca
        assert next_ca.subject == old_ca.subject  # same name, new key
        assert next_ca.public_key() != old_ca.public_key()
        next_ca.verify_directly_issued_by(next_ca)
        next_ra.verify_directly_issued_by(next_ca)
        check_new_with_old(cross, next_ca, old_ca)
        assert cross == x509.load_pem_x509_certificate((ca.directory / "cross-g2.pem").read_bytes())
        assert get(srv.url, "GetNextCACert").content == response.content  # signed once
        # openssl agrees: the signature verifies up to the current CA, the content is the
        # degenerate PKCS#7 with the next CA first.
        (tmp_path / "next.der").write_bytes(response.content)
        cms = subprocess.run(
            ["openssl", "cms", "-verify", "-inform", "DER", "-in", str(tmp_path / "next.der")]
            + ["-CAfile", str(old_ca_pem), "-purpose", "any", "-binary"]
            + ["-out", str(tmp_path / "inner.der")],
            capture_output=True,
            text=True,
        )
        assert cms.returncode == 0 and "Verification successful" in cms.stderr, cms
        inner = client.parse_ca_certs((tmp_path / "inner.der").read_bytes())
        assert inner == [next_ca, next_ra, cross]

        # Requests encrypted to the current RA enroll under the current CA meanwhile.
        before, _ = enroll(srv.url, ca, old, "before-activation")
        assert openssl_verify(old_ca_pem, before, tmp_path)

        # A request built now against the OLD RA certificate, sent after activation.
        stale_key = rsa.generate_private_key(65537, 2048)
        stale = client.build_pkcs_req(
            key=stale_key,
            ca_certs=old,
            challenge=ca.challenge,
            subject=x509.Name.from_rfc4514_string("CN=built-before-activation"),
        )

        # ---- activate + restart ---------------------------------------------------------
        done = rollover(ca, "activate")
        assert done.returncode == 0, done.stderr
        activated = load_settings(ca.config)
        assert activated.rollover.next is None and activated.rollover.generation == 2
        assert activated.ca.cert == ca.directory / "ca-g2.pem"
        assert [p for _, p in activated.rollover.previous_ra] == [ca.directory / "ra.pem"]
        nothing = rollover(ca, "activate")
        assert nothing.returncode == 2 and "no next CA" in nothing.stderr, nothing
        srv = restart(ca, srv)

        assert "GetNextCACert" not in caps(srv.url)
        assert get(srv.url, "GetNextCACert").status_code == 404
        current = ca_certs(srv.url)
        # Only the new CA and RA: the cross certificate (same subject and issuer name as the
        # new root) would send name-based chain building astray. It stays at a URL.
        assert current == [next_ca, next_ra] and old_ca not in current
        assert cross_cert(srv.url) == cross
        select_ca_and_ra(current, next_ca, next_ra)

        # New enrollments chain to the new CA (and not to the old one).
        after, _ = enroll(srv.url, ca, current, "after-activation")
        assert openssl_verify(ca.directory / "ca-g2.pem", after, tmp_path)
        assert not openssl_verify(old_ca_pem, after, tmp_path)
        # A client that trusts only the old root: new CA -> cross certificate -> old root.
        cross_pem = ca.directory / "cross-g2.pem"
        assert openssl_verify(old_ca_pem, after, tmp_path, untrusted=cross_pem)
        assert not openssl_verify(old_ca_pem, after, tmp_path, untrusted=ca.directory / "ra.pem")

        # The request encrypted to the old RA certificate still decrypts and enrolls, and is
        # answered by that RA: the client knows only the certificates it cached.
        result = client.open_cert_rep(post(srv.url, stale.der), stale, old)
        assert (result.pki_status, result.fail_info) == (SUCCESS, None)
        assert result.signer_cert == old_ra
        [issued] = result.certificates
        assert issued.public_key() == stale_key.public_key()
        assert openssl_verify(ca.directory / "ca-g2.pem", issued, tmp_path)
        assert openssl_verify(old_ca_pem, issued, tmp_path, untrusted=cross_pem)

        # micromdm's scepclient fetches GetCACert afresh and enrolls under the new CA.
        work = tmp_path / "scepclient"
        run = enroll_with_scepclient(srv.url, ca.challenge, work, "scepclient-after")
        assert run.returncode == 0, run.stdout + run.stderr
        check_issued(replace(ca, settings=activated), work, "scepclient-after")
    finally:
        srv.stop()
    assert "Traceback" not in srv.output()

    # ---- a second rollover: generation 3, both earlier RA keys keep decrypting ---------
    done = rollover(ca, "prepare", "--ca-key", "p256")
    assert done.returncode == 0, done.stderr
    assert rollover(ca, "activate").returncode == 0
    third = load_settings(ca.config)
    assert third.rollover.generation == 3 and third.ca.key.label == "hsmscep-ca-g3"
    assert [p.name for _, p in third.rollover.previous_ra] == ["ra-g2.pem", "ra.pem"]
    srv = start_server(ca)
    try:
        current = ca_certs(srv.url)
        assert current[0].subject == old_ca.subject and current[0] != next_ca
        # Generation 3 is cross-certified by generation 2 (the CA it replaced).
        assert len(current) == 2
        check_new_with_old(cross_cert(srv.url), current[0], next_ca)
        request = client.build_pkcs_req(
            key=rsa.generate_private_key(65537, 2048),
            ca_certs=old,
            challenge=ca.challenge,
            subject=x509.Name.from_rfc4514_string("CN=two-generations-old"),
        )
        reply = client.open_cert_rep(post(srv.url, request.der), request, old)
        assert (reply.pki_status, reply.fail_info) == (SUCCESS, None)
        assert reply.signer_cert == old_ra  # generation 1's RA, still valid
        assert openssl_verify(ca.directory / "ca-g3.pem", reply.certificates[0], tmp_path)
        g2_pem = ca.directory / "ca-g2.pem"
        cross3 = ca.directory / "cross-g3.pem"
        assert openssl_verify(g2_pem, reply.certificates[0], tmp_path, untrusted=cross3)
    finally:
        srv.stop()
    assert "Traceback" not in srv.output()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("[]", "must hold a JSON object"),
        ("{", "cannot read"),
        ('{"generation": 0}', "generation must be a positive integer"),
        ('{"surprise": 1}', "unknown key(s) surprise"),
        (
            '{"next": {"ca_key_label": "x", "ca_cert": "c.pem", "ra_cert": "r.pem"}}',
            "next.ra_key_label must be a non-empty string",
        ),  # fmt: skip
        ('{"current": []}', "current must be an object or null"),
        (
            '{"awaiting_cert": {"ca_key_label": "x", "ca_cert": "c.pem", "ra_key_label": "y", '
            '"ra_cert": "r.pem", "extra": 1}}',
            "unknown key(s) extra in awaiting_cert",
        ),  # fmt: skip
        (
            '{"next": {"ca_key_label": "x", "ca_cert": "c.pem", "ra_key_label": "y", '
            '"ra_cert": "r.pem", "cross_cert": 5}}',
            "next.cross_cert must be a non-empty string",
        ),  # fmt: skip
        (
            '{"next": {"ca_key_label": "x", "ca_cert": "c.pem", "ra_key_label": "y", '
            '"ra_cert": "r.pem", "cross_cert": "cross-g2.pem"}}',
            "next.cross_cert: cannot read",
        ),  # fmt: skip
        (
            '{"current": {"ca_key_label": "x", "ca_cert": "c.pem", "ra_key_label": "y", '
            '"ra_cert": "r.pem", "cross_cert": "."}}',
            "current.cross_cert: cannot read",
        ),  # fmt: skip
        ('{"previous_ra": [{"cert": "ra.pem"}]}', "previous_ra[0].key_label or"),
        ('{"previous_ra": [{"key_id": "zz", "cert": "ra.pem"}]}', "previous_ra[0].key_id"),
        ('{"previous_ra": [{"key_label": "a"}]}', "previous_ra[0].cert must be"),
    ],
)
def test_rollover_state_is_checked(dev_ca: DevCa, tmp_path: Path, state: str, message: str) -> None:
    config = tmp_path / "hsmscep.toml"
    text = dev_ca.config.read_text().replace('"pin"', f'"{dev_ca.directory / "pin"}"')
    text = text.replace('"challenge"', f'"{dev_ca.directory / "challenge"}"')
    config.write_text(text)
    (tmp_path / "rollover.json").write_text(state)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert message in str(info.value)
    assert "rollover" in str(info.value)


def test_rollover_state_file_is_configurable(dev_ca: DevCa, tmp_path: Path) -> None:
    settings = load_settings(dev_ca.config, {"HSMSCEP_ROLLOVER_STATE": str(tmp_path / "s.json")})
    assert settings.rollover.path == tmp_path / "s.json"
    assert settings.rollover.generation == 1 and settings.rollover.next is None
    assert settings.rollover.previous_ra == ()


def sign_ca_csr(csr_pem: bytes, root_key: rsa.RSAPrivateKey, root: x509.Certificate) -> bytes:
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    now = datetime.now(UTC)
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(root.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1000))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(root_key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.PEM)


def external_root() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name.from_rfc4514_string("CN=external test root")
    now = datetime.now(UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2000))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, root


def test_rollover_to_a_ca_signed_by_an_external_root(softhsm_dir: Path, tmp_path: Path) -> None:
    ca = make_ca(softhsm_dir, tmp_path / "ca", "rollover-ext")
    root_key, root = external_root()
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(root.public_bytes(Encoding.PEM))
    csr_path = tmp_path / "next-ca.csr"

    done = rollover(ca, "prepare", "--csr", str(csr_path), "--subject", "CN=issuing CA g2")
    assert done.returncode == 0, done.stderr
    waiting = load_settings(ca.config)
    assert waiting.rollover.awaiting_cert is not None and waiting.rollover.next is None
    assert waiting.rollover.awaiting_cert.ca_key.label == "hsmscep-ca-g2"
    assert rollover(ca, "activate").returncode == 2  # nothing prepared yet

    # A certificate for another key is refused; the root's signature on the CSR is accepted.
    (tmp_path / "root-as-ca.pem").write_bytes(root.public_bytes(Encoding.PEM))
    wrong = rollover(ca, "import-ca", "--cert", str(tmp_path / "root-as-ca.pem"))
    assert wrong.returncode == 2 and "does not certify" in wrong.stderr, wrong
    signed = tmp_path / "next-ca.pem"
    signed.write_bytes(sign_ca_csr(csr_path.read_bytes(), root_key, root))
    done = rollover(ca, "import-ca", "--cert", str(signed), "--chain", str(root_pem))
    assert done.returncode == 0, done.stderr
    state = json.loads((ca.directory / "rollover.json").read_text())
    assert state["awaiting_cert"] is None and state["next"]["ca_chain"] == "chain-g2.pem"

    srv = start_server(ca)
    try:
        old = ca_certs(srv.url)
        assert "GetNextCACert" in caps(srv.url)
        response = get(srv.url, "GetNextCACert")
        next_ca, next_ra, chain_root = client.parse_next_ca_certs(response.content, [old[1]])
        assert chain_root == root and next_ca.issuer == root.subject
        next_ra.verify_directly_issued_by(next_ca)
        assert rollover(ca, "activate").returncode == 0
        srv = restart(ca, srv)
        current = ca_certs(srv.url)
        assert current == [next_ca, next_ra, root]
        assert "GetNextCACert" not in caps(srv.url)
        cert, _ = enroll(srv.url, ca, current, "under-external-root")
        path = tmp_path / "leaf.pem"
        path.write_bytes(cert.public_bytes(Encoding.PEM))
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", str(root_pem)]
            + ["-untrusted", str(ca.directory / "ca-g2.pem"), str(path)],
            capture_output=True,
            text=True,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        # Sealed to the old RA certificate, still decrypted.
        request = client.build_pkcs_req(
            key=rsa.generate_private_key(65537, 2048),
            ca_certs=old,
            challenge=ca.challenge,
            subject=x509.Name.from_rfc4514_string("CN=old-ra-external"),
        )
        reply = client.open_cert_rep(post(srv.url, request.der), request, old)
        assert (reply.pki_status, reply.fail_info) == (SUCCESS, None)
        assert reply.signer_cert == old[1]  # answered by the RA it was sealed to
    finally:
        srv.stop()
    assert "Traceback" not in srv.output()

    # The current CA now has an external root: a self-signed next CA is not offered.
    refused = rollover(ca, "prepare")
    assert refused.returncode == 2 and "external root" in refused.stderr, refused
