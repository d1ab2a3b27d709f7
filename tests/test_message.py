"""message.decode_pki_message: a golden PKCSReq, tampering, hostile input, our own client."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hsmscep.errors import MessageError
from hsmscep.protocol import asn1, cms, message
from hsmscep.testing import client

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "smallstep-scep"
GOLDEN_TRANSACTION_ID = "A13090761A30F66664F85D37433D2065E1112BA1"


@pytest.fixture(scope="module")
def golden() -> bytes:
    path = VECTORS / "PKCSReq.der"
    if not path.is_file():
        pytest.skip(f"shared test vectors not found at {VECTORS} (clone ../shared beside the repo)")
    return path.read_bytes()


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ca_cert(key: rsa.RSAPrivateKey) -> x509.Certificate:
    # The recipient for our own messages; decoding never opens the envelope, so any RSA
    # certificate will do, even one with the client's own key.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    return client.self_signed_signer(key, name)


def _flip(der: bytes, at: int) -> bytes:
    return der[:at] + bytes((der[at] ^ 0x01,)) + der[at + 1 :]


# ---- the golden smallstep PKCSReq ---------------------------------------------------------


def test_golden_pkcs_req_decodes(golden: bytes) -> None:
    req = message.decode_pki_message(golden)
    assert req.message_type == "19"
    assert req.transaction_id == GOLDEN_TRANSACTION_ID
    assert req.sender_nonce is not None and len(req.sender_nonce) == 8
    assert req.digest.name == "sha1"
    cn = req.signer_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["MDM SCEP SIGNER"]
    assert req.signer_serial == 1
    assert req.signer_issuer_der == req.signer_cert.issuer.public_bytes()
    assert cms.decode_envelope(req.content).cipher.name == "des3"


def test_golden_signature_byte_flipped(golden: bytes) -> None:
    # No unsigned attributes: the signature value ends the message.
    for at in (len(golden) - 1, len(golden) - 100, len(golden) - 256):
        with pytest.raises(MessageError, match="signature does not verify"):
            message.decode_pki_message(_flip(golden, at))


def test_golden_signed_attribute_flipped(golden: bytes) -> None:
    req = message.decode_pki_message(golden)
    assert req.sender_nonce is not None
    targets = (GOLDEN_TRANSACTION_ID.encode(), req.sender_nonce, b"\x13\x0219")  # + messageType
    for value in targets:
        assert golden.count(value) == 1
        at = golden.index(value) + len(value) - 1
        with pytest.raises(MessageError, match="signature does not verify"):
            message.decode_pki_message(_flip(golden, at))


def test_golden_content_flipped(golden: bytes) -> None:
    content = message.decode_pki_message(golden).content
    at = golden.index(content) + 700
    with pytest.raises(MessageError, match="messageDigest"):
        message.decode_pki_message(_flip(golden, at))


def test_golden_truncated(golden: bytes) -> None:
    for cut in (1, 2, 4, 17, 100, 1000, len(golden) // 2, len(golden) - 257, len(golden) - 1):
        with pytest.raises(MessageError):
            message.decode_pki_message(golden[:cut])


def test_golden_trailing_garbage(golden: bytes) -> None:
    for tail in (b"\x00", b"\x00\x00", b"garbage" * 10):
        with pytest.raises(MessageError):
            message.decode_pki_message(golden + tail)


# ---- hostile input ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_random_garbage(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(1, 3000))
    if seed % 2:  # look like a SEQUENCE so the parser gets past the first byte
        data = asn1.seq(data)
    with pytest.raises(MessageError):
        message.decode_pki_message(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x30",
        b"\x30\x80",
        b"\x30\x00",
        b"\x30\x84\xff\xff\xff\xff",  # length far beyond the data
        b"\x30\x89" + b"\xff" * 9,  # length of lengths beyond anything sane
        b"\x04\x03abc",
        asn1.seq(asn1.oid(asn1.OID_DATA), asn1.explicit(0, asn1.octet_string(b"x"))),
        asn1.seq(asn1.oid(asn1.OID_SIGNED_DATA), asn1.explicit(0, asn1.seq())),
        cms.certs_only([]),  # SignedData without signerInfo
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(MessageError):
        message.decode_pki_message(data)


def _nested_definite(depth: int) -> bytes:
    out = b""
    for _ in range(depth):
        out = asn1.seq(out)
    return out


@pytest.mark.parametrize(
    "inner",
    [
        b"\x30\x80" * 100_000,  # indefinite lengths, never closed
        b"\x30\x80" * 100_000 + b"\x00\x00" * 100_000,  # indefinite lengths, closed
        _nested_definite(100_000),
    ],
    ids=["indefinite-open", "indefinite-closed", "definite"],
)
def test_deep_nesting(inner: bytes) -> None:
    for data in (
        inner,
        asn1.seq(asn1.oid(asn1.OID_SIGNED_DATA), asn1.explicit(0, inner)),
        asn1.seq(
            asn1.oid(asn1.OID_SIGNED_DATA), asn1.explicit(0, asn1.seq(asn1.integer(1), inner))
        ),
    ):
        with pytest.raises(MessageError):
            message.decode_pki_message(data)


# ---- messages from our client -------------------------------------------------------------


@pytest.mark.parametrize("digest", ["sha1", "sha224", "sha256", "sha384", "sha512"])
@pytest.mark.parametrize("message_type", ["19", "17", "20"])
def test_client_message_decodes(
    digest: str, message_type: str, key: rsa.RSAPrivateKey, ca_cert: x509.Certificate
) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"client {digest}")])
    built = client.build_pkcs_req(
        key=key,
        ca_certs=[ca_cert],
        challenge="pw",
        subject=subject,
        digest=digest,
        transaction_id=f"tx-{digest}-{message_type}",
        message_type=message_type,
    )
    req = message.decode_pki_message(built.der)
    assert req.message_type == message_type
    assert req.transaction_id == f"tx-{digest}-{message_type}"
    assert req.sender_nonce == built.sender_nonce
    assert req.digest.name == digest
    assert req.signer_cert == built.signer_cert
    assert req.signer_cert.subject == subject
    assert req.signer_serial == built.signer_cert.serial_number
    assert req.signer_issuer_der == built.signer_cert.issuer.public_bytes()
    envelope = cms.decode_envelope(req.content)
    assert envelope.recipients[0].recipient.matches(
        cms.CertId.of(ca_cert.public_bytes(Encoding.DER))
    )


def _signed(
    key: rsa.RSAPrivateKey, signer: x509.Certificate, content: bytes, *attributes: bytes
) -> bytes:
    return client.sign_pki_message(
        content=content,
        signed_attrs=asn1.set_of(*attributes),
        key=key,
        signer_cert=signer,
        digest="sha256",
    )


def test_signed_but_inconsistent(key: rsa.RSAPrivateKey, ca_cert: x509.Certificate) -> None:
    """Messages whose signature verifies but whose attributes are wrong or missing."""
    content = b"envelope stand-in"
    digest = hashes.Hash(hashes.SHA256())
    digest.update(content)
    md = asn1.attribute(asn1.OID_MESSAGE_DIGEST, asn1.octet_string(digest.finalize()))
    ct = asn1.attribute(asn1.OID_CONTENT_TYPE, asn1.oid(asn1.OID_DATA))
    mt = asn1.attribute(asn1.OID_MESSAGE_TYPE, asn1.printable_string("19"))
    tx = asn1.attribute(asn1.OID_TRANSACTION_ID, asn1.printable_string("tx-1"))
    nonce = asn1.attribute(asn1.OID_SENDER_NONCE, asn1.octet_string(b"n" * 16))

    ok = message.decode_pki_message(_signed(key, ca_cert, content, ct, md, mt, tx, nonce))
    assert (ok.message_type, ok.transaction_id, ok.sender_nonce) == ("19", "tx-1", b"n" * 16)
    # senderNonce is optional (old IOS, interop-quirks #13).
    assert (
        message.decode_pki_message(_signed(key, ca_cert, content, ct, md, mt, tx)).sender_nonce
        is None
    )

    cases = {
        "transactionID": (ct, md, mt, nonce),
        "messageType": (ct, md, tx, nonce),
        "messageDigest": (ct, mt, tx, nonce),
        "twice": (
            ct,
            md,
            mt,
            tx,
            nonce,
            asn1.attribute(asn1.OID_MESSAGE_TYPE, asn1.printable_string("17")),
        ),
        "exactly one value": (
            ct,
            md,
            asn1.attribute(
                asn1.OID_MESSAGE_TYPE, asn1.printable_string("19"), asn1.printable_string("17")
            ),
            tx,
        ),
        "contentType": (
            asn1.attribute(asn1.OID_CONTENT_TYPE, asn1.oid(asn1.OID_SIGNED_DATA)),
            md,
            mt,
            tx,
        ),
        "transactionID length": (
            ct,
            md,
            mt,
            asn1.attribute(asn1.OID_TRANSACTION_ID, asn1.printable_string("x" * 300)),
        ),
    }
    for error, attributes in cases.items():
        with pytest.raises(MessageError, match=error):
            message.decode_pki_message(_signed(key, ca_cert, content, *attributes))
    # The right attributes over other content.
    with pytest.raises(MessageError, match="messageDigest"):
        message.decode_pki_message(_signed(key, ca_cert, b"other content", ct, md, mt, tx))
