"""cms: the golden envelope, seal/open round trips, certs_only, golden CertRep verification."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from asn1crypto import csr as asn1_csr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hsmscep.errors import MessageError
from hsmscep.protocol import asn1, cms, message
from hsmscep.protocol.algorithms import CIPHERS, CIPHERS_BY_NAME, DIGESTS_BY_NAME, ContentCipher
from hsmscep.testing import client

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "smallstep-scep"
APPLE_CN = "com.apple.security.scep.063D7953-1338-4BF0-8F99-913382996224"
NOW = datetime.now(UTC)


def _vector(name: str) -> bytes:
    path = VECTORS / name
    if not path.is_file():
        pytest.skip(f"shared test vectors not found at {VECTORS} (clone ../shared beside the repo)")
    return path.read_bytes()


def _legacy_pem_key(pem: bytes, passphrase: bytes) -> rsa.RSAPrivateKey:
    """Decrypt an OpenSSL "traditional" encrypted PEM key (DEK-Info: DES-EDE3-CBC).

    cryptography refuses an empty passphrase, which is what the smallstep testca key uses; the
    format is simple enough to open by hand (EVP_BytesToKey with MD5, one iteration).
    """
    lines = pem.decode().strip().splitlines()
    headers = dict(line.split(": ", 1) for line in lines if ": " in line)
    cipher_name, iv_hex = headers["DEK-Info"].split(",")
    assert cipher_name == "DES-EDE3-CBC"
    iv = bytes.fromhex(iv_hex)
    body = base64.b64decode("".join(line for line in lines[1:-1] if ":" not in line))
    material, block = b"", b""
    while len(material) < 24:
        block = hashlib.md5(block + passphrase + iv[:8], usedforsecurity=False).digest()
        material += block
    der = CIPHERS_BY_NAME["des3"].decrypt(material[:24], iv, body)
    key = serialization.load_der_private_key(der, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def testca_cert() -> x509.Certificate:
    return x509.load_pem_x509_certificate(_vector("testca/ca.pem"))


@pytest.fixture(scope="module")
def testca_key() -> rsa.RSAPrivateKey:
    return _legacy_pem_key(_vector("testca/ca.key"), b"")


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def cert(key: rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "recipient")])
    return client.self_signed_signer(key, name)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _rid(cert: x509.Certificate) -> bytes:
    return cms.issuer_and_serial(cert.issuer.public_bytes(), cert.serial_number)


def _unwrap(envelope: cms.Envelope, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> bytes:
    [kt] = envelope.recipients
    assert kt.recipient.matches(cms.CertId.of(_der(cert)))
    pad = padding.PKCS1v15() if kt.oaep is None else kt.oaep.padding()
    return envelope.open(key.decrypt(kt.encrypted_key, pad))


# ---- the golden PKCSReq envelope ----------------------------------------------------------


def test_testca_key_matches_cert(
    testca_key: rsa.RSAPrivateKey, testca_cert: x509.Certificate
) -> None:
    assert testca_key.public_key() == testca_cert.public_key()


def test_golden_envelope(testca_key: rsa.RSAPrivateKey, testca_cert: x509.Certificate) -> None:
    content = message.decode_pki_message(_vector("PKCSReq.der")).content
    envelope = cms.decode_envelope(content)
    assert envelope.cipher.name == "des3" and len(envelope.iv) == 8
    [kt] = envelope.recipients
    assert kt.oaep is None
    assert kt.recipient.matches(cms.CertId.of(_der(testca_cert)))
    assert kt.recipient.serial == testca_cert.serial_number
    cek = testca_key.decrypt(kt.encrypted_key, padding.PKCS1v15())
    assert len(cek) == 24
    # The CSR has version 2 (an Apple quirk), which cryptography refuses: read it with asn1crypto.
    csr = asn1_csr.CertificationRequest.load(envelope.open(cek))
    info = csr["certification_request_info"]
    assert info["version"].native == 2
    assert info["subject"].native["common_name"] == APPLE_CN
    public_key = serialization.load_der_public_key(info["subject_pk_info"].dump())
    assert isinstance(public_key, rsa.RSAPublicKey)
    algorithm = DIGESTS_BY_NAME[csr["signature_algorithm"].hash_algo].hash()
    public_key.verify(csr["signature"].native, info.dump(), padding.PKCS1v15(), algorithm)


def test_golden_envelope_not_for_another_cert(cert: x509.Certificate) -> None:
    content = message.decode_pki_message(_vector("PKCSReq.der")).content
    [kt] = cms.decode_envelope(content).recipients
    assert not kt.recipient.matches(cms.CertId.of(_der(cert)))


# ---- seal / decode_envelope ---------------------------------------------------------------


@pytest.mark.parametrize("cipher", sorted(CIPHERS_BY_NAME))
@pytest.mark.parametrize(
    "oaep",
    [None, cms.OaepParams(), cms.OaepParams("sha256", "sha256", b"label")],
    ids=["pkcs1v15", "oaep-sha1", "oaep-sha256-label"],
)
def test_seal_round_trip(
    cipher: str, oaep: cms.OaepParams | None, key: rsa.RSAPrivateKey, cert: x509.Certificate
) -> None:
    public_key = cert.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    algorithm = CIPHERS_BY_NAME[cipher]
    for content in (b"", b"x", b"y" * algorithm.block_size, bytes(range(256)) * 7):
        sealed = cms.seal(
            content, recipient_key=public_key, recipient_id=_rid(cert), cipher=algorithm, oaep=oaep
        )
        envelope = cms.decode_envelope(sealed)
        assert envelope.cipher == algorithm
        assert envelope.recipients[0].oaep == oaep
        assert len(envelope.ciphertext) % algorithm.block_size == 0
        assert len(envelope.ciphertext) > len(content)
        assert _unwrap(envelope, key, cert) == content


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize(
    ("cipher", "oaep"), [("aes256", None), ("aes128", cms.OaepParams()), ("des3", None)]
)
def test_seal_openssl_decrypts(
    cipher: str,
    oaep: cms.OaepParams | None,
    tmp_path: Path,
    key: rsa.RSAPrivateKey,
    cert: x509.Certificate,
) -> None:
    public_key = cert.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    content = b"sealed for openssl " * 20
    sealed = cms.seal(
        content,
        recipient_key=public_key,
        recipient_id=_rid(cert),
        cipher=CIPHERS_BY_NAME[cipher],
        oaep=oaep,
    )
    (tmp_path / "env.der").write_bytes(sealed)
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    command = ["openssl", "cms", "-decrypt", "-inform", "DER", "-in", "env.der"]
    done = subprocess.run(
        [*command, "-recip", "cert.pem", "-inkey", "key.pem"],
        cwd=tmp_path,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == content


def test_decode_envelope_refuses_unknown_cipher(cert: x509.Certificate) -> None:
    public_key = cert.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    # AES-128 under the RC2-CBC OID: the parser must refuse by OID, not by trying it.
    rc2 = ContentCipher("aes128", "1.2.840.113549.3.2", 16)
    assert rc2.oid not in CIPHERS
    sealed = cms.seal(b"x", recipient_key=public_key, recipient_id=_rid(cert), cipher=rc2)
    with pytest.raises(cms.UnsupportedAlgorithm):
        cms.decode_envelope(sealed)


def test_decode_envelope_malformed(cert: x509.Certificate) -> None:
    public_key = cert.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    sealed = cms.seal(
        b"content",
        recipient_key=public_key,
        recipient_id=_rid(cert),
        cipher=CIPHERS_BY_NAME["aes128"],
    )
    bad = [b"", b"\x30\x80" * 50_000, b"\x30\x00", cms.certs_only([]), sealed + b"\x00"]
    bad += [sealed[:cut] for cut in (1, 10, 100, len(sealed) - 1)]
    for data in bad:
        with pytest.raises(MessageError):
            cms.decode_envelope(data)


def test_open_with_wrong_key_fails(cert: x509.Certificate) -> None:
    public_key = cert.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    sealed = cms.seal(
        b"content",
        recipient_key=public_key,
        recipient_id=_rid(cert),
        cipher=CIPHERS_BY_NAME["aes256"],
    )
    envelope = cms.decode_envelope(sealed)
    for cek in (b"", b"\x00" * 16, b"\x00" * 32):
        with pytest.raises(MessageError):
            envelope.open(cek)


# ---- certs_only ---------------------------------------------------------------------------


def test_certs_only_keeps_order(key: rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
    big = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x" * 60)] * 3)
    longer = (
        x509.CertificateBuilder()
        .subject_name(big)
        .issuer_name(cert.subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    ders = [_der(longer), _der(cert)]
    assert ders != sorted(ders)  # DER SET OF sorting would swap them (interop-quirks #7)
    for order in (ders, ders[::-1]):
        info = asn1_cms.ContentInfo.load(cms.certs_only(order))
        assert info["content_type"].native == "signed_data"
        signed = info["content"]
        assert [c.chosen.dump() for c in signed["certificates"]] == order
        assert len(signed["signer_infos"]) == 0
        assert [_der(c) for c in client.parse_ca_certs(cms.certs_only(order))] == order


# ---- the golden CertRep -------------------------------------------------------------------


def test_golden_cert_rep_verifies(testca_cert: x509.Certificate) -> None:
    request = message.decode_pki_message(_vector("PKCSReq.der"))
    rep = client.verify_signed_message(_vector("CertRep.der"), [testca_cert])
    assert rep.signer_cert == testca_cert
    attrs = rep.attributes
    assert attrs[asn1.OID_MESSAGE_TYPE] == "3"
    assert attrs[asn1.OID_PKI_STATUS] == "0"
    assert attrs[asn1.OID_TRANSACTION_ID] == request.transaction_id
    assert attrs[asn1.OID_RECIPIENT_NONCE] == request.sender_nonce
    # Encrypted to the PKCSReq's signer certificate, whose key we do not have.
    [kt] = cms.decode_envelope(rep.content).recipients
    assert kt.recipient.matches(cms.CertId.of(_der(request.signer_cert)))


def test_golden_cert_rep_without_sender_nonce(
    testca_cert: x509.Certificate, testca_key: rsa.RSAPrivateKey
) -> None:
    # smallstep's CertRep omits senderNonce, which RFC 8894 §3.2.1.5 requires: we refuse it
    # only after the signature, transactionID and recipientNonce checks have passed.
    request = message.decode_pki_message(_vector("PKCSReq.der"))
    assert request.sender_nonce is not None
    ours = client.ClientRequest(
        b"", request.transaction_id, request.sender_nonce, testca_key, request.signer_cert
    )
    with pytest.raises(MessageError, match="senderNonce"):
        client.open_cert_rep(_vector("CertRep.der"), ours, [testca_cert])


def test_golden_cert_rep_tampered_or_untrusted(testca_cert: x509.Certificate) -> None:
    der = _vector("CertRep.der")
    other = x509.load_pem_x509_certificate(_vector("testclient/client.pem"))
    with pytest.raises(MessageError, match="trusted"):
        client.verify_signed_message(der, [other])
    flipped = der[:-1] + bytes((der[-1] ^ 1,))
    with pytest.raises(MessageError, match="signature does not verify"):
        client.verify_signed_message(flipped, [testca_cert])


def test_golden_cert_rep_without_embedded_signer() -> None:
    # The signer certificate is not in the message: it comes from GetCACert (ca2.pem).
    der = _vector("testca2/CertRep_NoCertificatesForSigners.der")
    assert not asn1_cms.ContentInfo.load(der)["content"]["certificates"]
    trusted = x509.load_pem_x509_certificates(_vector("testca2/ca2.pem"))
    rep = client.verify_signed_message(der, trusted)
    assert rep.signer_cert in trusted
    assert rep.attributes[asn1.OID_MESSAGE_TYPE] == "3"
