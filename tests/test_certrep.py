"""protocol.certrep.build_cert_rep for SUCCESS, PENDING and FAILURE, read by other code.

asn1crypto parses the SignedData and the envelope, cryptography checks the RA's signature over
the signed attributes and decrypts the certificates with the client's key, and `openssl cms`
verifies and decrypts where openssl is installed. The RA key is an ExternalRsaKey over a
software key, as the server's HSM key is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hsmscep.protocol import cms, message
from hsmscep.protocol.algorithms import CIPHERS_BY_NAME, DIGESTS_BY_NAME
from hsmscep.protocol.certrep import ResponseSigner, build_cert_rep, seal_certificates
from hsmscep.protocol.codes import FailInfo, PkiStatus
from hsmscep.protocol.message import PkiRequest
from hsmscep.testing import client
from tests.conftest import software_root
from tests.test_keys import software_rsa

NOW = datetime.now(UTC)
OPENSSL = shutil.which("openssl")
# RFC 8894 §3.2.1 attribute OIDs, spelled out here rather than taken from hsmscep.protocol.asn1.
CONTENT_TYPE = "1.2.840.113549.1.9.3"
MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
PKI_STATUS = "2.16.840.1.113733.1.9.3"
FAIL_INFO = "2.16.840.1.113733.1.9.4"
SENDER_NONCE = "2.16.840.1.113733.1.9.5"
RECIPIENT_NONCE = "2.16.840.1.113733.1.9.6"
TRANSACTION_ID = "2.16.840.1.113733.1.9.7"
ID_DATA = "1.2.840.113549.1.7.1"


@dataclasses.dataclass(frozen=True)
class Parties:
    ra_key: rsa.RSAPrivateKey
    ra_cert: x509.Certificate
    client_key: rsa.RSAPrivateKey
    client_cert: x509.Certificate  # the client's self-signed signer: the reply's recipient
    issued: x509.Certificate  # stands in for the certificate a SUCCESS delivers


@cache
def parties() -> Parties:
    ra_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ra_cert = software_root(ra_key, _name("CertRep Test RA"), NOW)
    client_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issued = (
        x509.CertificateBuilder()
        .subject_name(_name("device-1"))
        .issuer_name(ra_cert.subject)
        .public_key(client_key.public_key())
        .serial_number(0x5CE9)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=30))
        .sign(ra_key, hashes.SHA256())
    )
    client_cert = client.self_signed_signer(client_key, _name("device-1"))
    return Parties(ra_key, ra_cert, client_key, client_cert, issued)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def signer() -> ResponseSigner:
    return ResponseSigner.of(parties().ra_cert, software_rsa(parties().ra_key, decrypt=False))


def request(digest: str = "sha256", transaction_id: str | None = None) -> PkiRequest:
    """A PKCSReq from our test client, decoded (and its signature checked) by the server."""
    p = parties()
    req = client.build_pkcs_req(
        key=p.client_key,
        ca_certs=[p.ra_cert],
        challenge="secret",
        subject=_name("device-1"),
        digest=digest,
        transaction_id=transaction_id,
        signer_cert=p.client_cert,
    )
    return message.decode_pki_message(req.der)


def reply(
    status: PkiStatus,
    req: PkiRequest,
    *,
    cipher: str = "aes256",
    oaep: cms.OaepParams | None = None,
    nonce: bytes = b"\x5a" * 16,
) -> bytes:
    envelope = None
    if status == PkiStatus.SUCCESS:
        certs = [parties().issued.public_bytes(Encoding.DER)]
        envelope = seal_certificates(certs, req, CIPHERS_BY_NAME[cipher], oaep)
    fail_info = FailInfo.BAD_REQUEST if status == PkiStatus.FAILURE else None
    return build_cert_rep(
        req, signer(), status=status, fail_info=fail_info, envelope=envelope, sender_nonce=nonce
    )


# ---- reading a CertRep with asn1crypto and cryptography -------------------------------------


class _AnyValues(core.SetOf):
    _child_spec = core.Any


class _Attribute(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("values", _AnyValues)]


class _Attributes(core.SetOf):
    _child_spec = _Attribute


@dataclasses.dataclass(frozen=True)
class Read:
    attributes: dict[str, object]
    content: bytes | None  # the eContent, None when absent
    signed_data: asn1_cms.SignedData


def read_cert_rep(der: bytes, digest: str) -> Read:
    """Parse with asn1crypto and check the RA signature over the signed attributes."""
    info = asn1_cms.ContentInfo.load(der, strict=True)
    assert info["content_type"].dotted == "1.2.840.113549.1.7.2"
    sd = info["content"]
    assert sd["version"].native == "v1"
    assert [a["algorithm"].dotted for a in sd["digest_algorithms"]] == [DIGESTS_BY_NAME[digest].oid]
    certs = [c.chosen.dump() for c in sd["certificates"]]
    assert certs == [parties().ra_cert.public_bytes(Encoding.DER)]
    assert len(sd["signer_infos"]) == 1
    si = sd["signer_infos"][0]
    sid = si["sid"].chosen
    assert sid["serial_number"].native == parties().ra_cert.serial_number
    assert sid["issuer"].dump() == parties().ra_cert.issuer.public_bytes()
    assert si["digest_algorithm"]["algorithm"].dotted == DIGESTS_BY_NAME[digest].oid
    assert si["signature_algorithm"]["algorithm"].dotted == "1.2.840.113549.1.1.1"
    # The signature covers the DER SET OF, not the [0] IMPLICIT encoding in the message.
    signed_attrs = b"\x31" + si["signed_attrs"].dump()[1:]
    ra_public = parties().ra_cert.public_key()
    assert isinstance(ra_public, rsa.RSAPublicKey)
    ra_public.verify(
        si["signature"].native, signed_attrs, padding.PKCS1v15(), DIGESTS_BY_NAME[digest].hash()
    )
    attributes: dict[str, object] = {}
    encodings = []
    # Read generically: asn1crypto's registered SCEP types would refuse a UTF8String
    # transactionID, and this reader should not lean on hsmscep's registration anyway.
    for attr in _Attributes.load(signed_attrs):
        assert len(attr["values"]) == 1, attr["type"].dotted
        assert attr["type"].dotted not in attributes
        encodings.append(attr.dump())
        value = core.load(attr["values"][0].dump())
        attributes[attr["type"].dotted] = (
            value.dotted if isinstance(value, core.ObjectIdentifier) else value.native
        )
    assert encodings == sorted(encodings)  # DER: a SET OF in ascending order
    encap = sd["encap_content_info"]
    assert encap["content_type"].dotted == ID_DATA
    content = encap["content"].native if encap["content"] else None
    assert not si["unsigned_attrs"]
    return Read(attributes, content, sd)


def open_envelope(envelope: bytes) -> list[x509.Certificate]:
    """Decrypt the pkcsPKIEnvelope with the client's key: asn1crypto plus cryptography."""
    info = asn1_cms.ContentInfo.load(envelope, strict=True)
    assert info["content_type"].native == "enveloped_data"
    env = info["content"]
    assert len(env["recipient_infos"]) == 1
    ktri = env["recipient_infos"][0].chosen
    rid = ktri["rid"].chosen  # RFC 8894 §3.3.2: to the request's signer certificate
    assert rid["serial_number"].native == parties().client_cert.serial_number
    assert rid["issuer"].dump() == parties().client_cert.issuer.public_bytes()
    algorithm = ktri["key_encryption_algorithm"]
    if algorithm["algorithm"].native == "rsaes_oaep":
        params = algorithm["parameters"]
        hash_name = params["hash_algorithm"]["algorithm"].native
        mgf_name = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
        pad: padding.AsymmetricPadding = padding.OAEP(
            mgf=padding.MGF1(DIGESTS_BY_NAME[mgf_name].hash()),
            algorithm=DIGESTS_BY_NAME[hash_name].hash(),
            label=None,
        )
    else:
        assert algorithm["algorithm"].native == "rsaes_pkcs1v15"
        pad = padding.PKCS1v15()
    cek = parties().client_key.decrypt(ktri["encrypted_key"].native, pad)
    eci = env["encrypted_content_info"]
    assert eci["content_type"].dotted == ID_DATA
    cipher_name = eci["content_encryption_algorithm"].encryption_cipher
    iv = eci["content_encryption_algorithm"].encryption_iv
    block = TripleDES(cek) if cipher_name == "tripledes" else algorithms.AES(cek)
    decryptor = Cipher(block, modes.CBC(iv)).decryptor()
    padded = decryptor.update(eci["encrypted_content"].native) + decryptor.finalize()
    unpadder = sym_padding.PKCS7(block.block_size).unpadder()
    degenerate = asn1_cms.ContentInfo.load(unpadder.update(padded) + unpadder.finalize())
    sd = degenerate["content"]
    assert not sd["signer_infos"] and sd["encap_content_info"]["content"].native is None
    return [x509.load_der_x509_certificate(c.chosen.dump()) for c in sd["certificates"]]


# ---- the three statuses -----------------------------------------------------------------------


@pytest.mark.parametrize("digest", sorted(DIGESTS_BY_NAME))
def test_success_signed_attributes_and_signature(digest: str) -> None:
    req = request(digest)
    read = read_cert_rep(reply(PkiStatus.SUCCESS, req), digest)
    assert read.content is not None
    assert read.attributes == {
        CONTENT_TYPE: ID_DATA,
        MESSAGE_DIGEST: hashlib.new(digest, read.content).digest(),
        MESSAGE_TYPE: "3",
        PKI_STATUS: "0",
        TRANSACTION_ID: req.transaction_id,
        SENDER_NONCE: b"\x5a" * 16,
        RECIPIENT_NONCE: req.sender_nonce,
    }


@pytest.mark.parametrize(
    ("cipher", "oaep"),
    [
        ("aes256", None),
        ("aes128", None),
        ("des3", None),
        ("aes256", cms.OaepParams()),
        ("aes128", cms.OaepParams("sha256", "sha256")),
    ],
    ids=["aes256", "aes128", "des3", "aes256-oaep", "aes128-oaep-sha256"],
)
def test_success_envelope_opens_to_the_certificate(
    cipher: str, oaep: cms.OaepParams | None
) -> None:
    read = read_cert_rep(reply(PkiStatus.SUCCESS, request(), cipher=cipher, oaep=oaep), "sha256")
    assert read.content is not None
    assert open_envelope(read.content) == [parties().issued]


@pytest.mark.parametrize("status", [PkiStatus.PENDING, PkiStatus.FAILURE])
def test_pending_and_failure_signed_attributes(status: PkiStatus) -> None:
    req = request()
    read = read_cert_rep(reply(status, req), "sha256")
    # PENDING and FAILURE carry an empty eContent (OpenSSL refuses none); the messageDigest
    # is over those empty bytes.
    assert read.content == b""
    expected: dict[str, object] = {
        CONTENT_TYPE: ID_DATA,
        MESSAGE_DIGEST: hashlib.sha256(b"").digest(),
        MESSAGE_TYPE: "3",
        PKI_STATUS: status.value,
        TRANSACTION_ID: req.transaction_id,
        SENDER_NONCE: b"\x5a" * 16,
        RECIPIENT_NONCE: req.sender_nonce,
    }
    if status == PkiStatus.FAILURE:
        expected[FAIL_INFO] = FailInfo.BAD_REQUEST.value
    assert read.attributes == expected


def test_transaction_id_echoed_exactly() -> None:
    # Not a PrintableString ('_' and '*' are outside its set): echoed as UTF8String.
    req = request(transaction_id="device_42*renewal")
    read = read_cert_rep(reply(PkiStatus.PENDING, req), "sha256")
    assert read.attributes[TRANSACTION_ID] == "device_42*renewal"
    si = read.signed_data["signer_infos"][0]
    attrs = _Attributes.load(b"\x31" + si["signed_attrs"].dump()[1:])
    tx = next(a for a in attrs if a["type"].dotted == TRANSACTION_ID)
    assert isinstance(core.load(tx["values"][0].dump()), core.UTF8String)


def test_no_recipient_nonce_without_a_sender_nonce() -> None:
    # Old Cisco IOS sends no senderNonce (interop-quirks #13): nothing to echo.
    req = dataclasses.replace(request(), sender_nonce=None)
    read = read_cert_rep(reply(PkiStatus.FAILURE, req), "sha256")
    assert RECIPIENT_NONCE not in read.attributes
    assert read.attributes[PKI_STATUS] == "2"


def test_our_client_opens_all_three() -> None:
    # The test client's own reader (asn1crypto-based) agrees with the checks above.
    p = parties()
    req = client.build_pkcs_req(
        key=p.client_key, ca_certs=[p.ra_cert], challenge="secret", subject=_name("device-1")
    )
    decoded = message.decode_pki_message(req.der)
    for status in PkiStatus:
        result = client.open_cert_rep(reply(status, decoded), req, [p.ra_cert])
        assert result.pki_status == status.value
        assert result.certificates == ([p.issued] if status == PkiStatus.SUCCESS else [])


# ---- openssl, where installed -------------------------------------------------------------------


def _openssl(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *args], capture_output=True, timeout=60)


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
def test_openssl_verifies_and_decrypts_success(tmp_path: Path) -> None:
    p = parties()
    rep, out = tmp_path / "rep.der", tmp_path / "envelope.der"
    rep.write_bytes(reply(PkiStatus.SUCCESS, request()))
    done = _openssl("cms", "-verify", "-noverify", "-inform", "DER", "-in", rep, "-out", out)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Verification successful" in done.stderr
    key, cert = tmp_path / "client.key", tmp_path / "client.pem"
    key.write_bytes(
        p.client_key.private_bytes(
            Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert.write_bytes(p.client_cert.public_bytes(Encoding.PEM))
    plain = tmp_path / "certs.der"
    done = _openssl(
        "cms", "-decrypt", "-inform", "DER", "-in", out, "-inkey", key, "-recip", cert,
        "-out", plain,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    degenerate = asn1_cms.ContentInfo.load(plain.read_bytes())
    certs = [c.chosen.dump() for c in degenerate["content"]["certificates"]]
    assert certs == [p.issued.public_bytes(Encoding.DER)]


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
@pytest.mark.parametrize("status", [PkiStatus.PENDING, PkiStatus.FAILURE])
def test_openssl_on_pending_and_failure(status: PkiStatus, tmp_path: Path) -> None:
    rep, empty = tmp_path / "rep.der", tmp_path / "empty"
    rep.write_bytes(reply(status, request()))
    empty.write_bytes(b"")
    # The signature and messageDigest verify with the empty content supplied detached.
    done = _openssl(
        "cms", "-verify", "-noverify", "-inform", "DER", "-in", rep, "-content", empty,
        "-out", os.devnull,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert b"Verification successful" in done.stderr
    # And on its own, by OpenSSL's CMS and PKCS#7 (smime: certmonger's and sscep's) code:
    # the empty eContent is there.
    for command in ("cms", "smime"):
        done = _openssl(
            command, "-verify", "-noverify", "-inform", "DER", "-in", rep, "-out", os.devnull
        )
        assert done.returncode == 0, (command, done.stderr.decode())
        assert b"Verification successful" in done.stderr
