"""Every CertRep, whatever its status, verifies with OpenSSL's PKCS#7 and CMS code (the code
certmonger and sscep use): FAILURE and PENDING carry an empty eContent, not none."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.protocol import cms
from hsmscep.protocol.certrep import ResponseSigner, build_cert_rep, seal_certificates
from hsmscep.protocol.codes import FailInfo, PkiStatus
from hsmscep.protocol.keys import ExternalRsaKey
from hsmscep.protocol.message import decode_pki_message
from hsmscep.testing import client
from tests.conftest import software_root

OPENSSL = shutil.which("openssl")
RA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RA_CERT = software_root(RA_KEY, x509.Name.from_rfc4514_string("CN=test RA"), datetime.now(UTC))
CLIENT_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _signer() -> ResponseSigner:
    # A software key behind the same ExternalRsaKey the HSM path uses: DigestInfo in, signature out.
    def raw_sign(digest_info: bytes) -> bytes:
        return RA_KEY.sign(digest_info, padding.PKCS1v15(), utils.NoDigestInfo())

    return ResponseSigner.of(RA_CERT, ExternalRsaKey(RA_KEY.public_key(), raw_sign=raw_sign))


def _cert_rep(status: PkiStatus) -> bytes:
    built = client.build_pkcs_req(
        key=CLIENT_KEY,
        ca_certs=[RA_CERT],
        challenge="secret",
        subject=x509.Name.from_rfc4514_string("CN=device"),
    )
    request = decode_pki_message(built.der)
    envelope = None
    if status == PkiStatus.SUCCESS:
        envelope = seal_certificates(
            [RA_CERT.public_bytes(Encoding.DER)],
            request,
            cms.decode_envelope(request.content).cipher,
            None,
        )
    return build_cert_rep(
        request,
        _signer(),
        status=status,
        fail_info=FailInfo.BAD_REQUEST if status == PkiStatus.FAILURE else None,
        envelope=envelope,
        sender_nonce=cms.random_nonce(),
    )


@pytest.mark.parametrize("status", list(PkiStatus))
def test_every_status_has_encapsulated_content(status: PkiStatus) -> None:
    reply = _cert_rep(status)
    content = asn1_cms.ContentInfo.load(reply)["content"]["encap_content_info"]["content"]
    assert content.native is not None  # present, possibly empty
    if status != PkiStatus.SUCCESS:
        assert content.native == b""
    assert client.verify_signed_message(reply, [RA_CERT]).content == content.native


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
@pytest.mark.parametrize("command", ["smime", "cms"])
@pytest.mark.parametrize("status", list(PkiStatus))
def test_openssl_verifies_every_status(tmp_path: Path, command: str, status: PkiStatus) -> None:
    assert OPENSSL is not None
    reply = tmp_path / "reply.der"
    reply.write_bytes(_cert_rep(status))
    ra = tmp_path / "ra.pem"
    ra.write_bytes(RA_CERT.public_bytes(Encoding.PEM))
    done = subprocess.run(
        [OPENSSL, command, "-verify", "-inform", "DER", "-in", str(reply), "-binary"]
        + ["-CAfile", str(ra), "-purpose", "any", "-out", str(tmp_path / "content")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Verification successful" in done.stderr
    if status != PkiStatus.SUCCESS:
        assert (tmp_path / "content").read_bytes() == b""
