"""A robustness corpus generated from valid requests (robustness.md): each case a body and the
answer it is owed. Pure: no I/O; tests/test_corpus.py sends the cases and checks the answers.

`Expect.REFUSED_HTTP` cases fail before the client's signature verifies (a 4xx); the
`Expect.FAILURE` ones verify and must get a signed FAILURE with the named failInfo;
`Expect.ANY_DOCUMENTED` ones (mutations of unsigned bytes that BER may tolerate) may get either,
but never a 5xx, an exception name or the service's catch-all.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmscep.protocol import asn1, cms
from hsmscep.protocol.algorithms import CIPHERS_BY_NAME
from hsmscep.protocol.codes import MessageType
from hsmscep.testing import requests as client

MAX_SAMPLES = 40  # per mutation family: the suite stays fast, the boundaries stay covered


class Expect(Enum):
    REFUSED_HTTP = "4xx"
    FAILURE = "signed FAILURE"
    ANY_DOCUMENTED = "4xx or a signed CertRep"


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    expect: Expect
    fail_info: str | None = None  # for Expect.FAILURE: "0" badAlg, "1" badMessageCheck, ...


@dataclass(frozen=True)
class Node:
    start: int
    header: int  # tag and length octets
    length: int

    @property
    def end(self) -> int:
        return self.start + self.header + self.length


def nodes(der: bytes) -> list[Node]:
    """Every TLV of a DER value, outer first; descends into constructed values only."""
    found: list[Node] = []
    stack = [(0, len(der))]
    while stack:
        offset, limit = stack.pop()
        while offset < limit:
            tag, first = der[offset], der[offset + 1]
            if first < 0x80:
                header, length = 2, first
            else:
                count = first & 0x7F
                header = 2 + count
                length = int.from_bytes(der[offset + 2 : offset + header], "big")
            node = Node(offset, header, length)
            found.append(node)
            if tag & 0x20:
                stack.append((offset + header, node.end))
            offset = node.end
    return sorted(found, key=lambda n: n.start)


def _sample(items: list[Node]) -> list[Node]:
    step = max(1, len(items) // MAX_SAMPLES)
    return items[::step][:MAX_SAMPLES]


def structural(der: bytes) -> Iterator[Case]:
    """Truncations at every sampled boundary, corrupted lengths and tags of a valid request."""
    tree = _sample(nodes(der))
    for i, node in enumerate(tree):
        for cut in (node.start, node.start + node.header, node.end - 1):
            if 0 < cut < len(der):
                yield Case(f"truncated-{i}-{cut}", der[:cut], Expect.REFUSED_HTTP)
        rest = der[node.start + node.header :]
        tag = der[node.start : node.start + 1]
        lengths = {
            "huge": b"\x84\xff\xff\xff\xff",
            "zero": b"\x00",
            "indefinite": b"\x80",
            "plus-one": asn1.der_length(node.length + 1),
            "non-minimal": b"\x84" + node.length.to_bytes(4, "big"),
        }
        for label, length in lengths.items():
            body = der[: node.start] + tag + length + rest
            # BER tolerates a non-minimal length, an outer indefinite one may still parse, and a
            # zero one on a node the reader skips (the SET of digest algorithms) changes nothing.
            expect = Expect.ANY_DOCUMENTED if label != "huge" else None
            yield Case(f"length-{label}-{i}", body, expect or Expect.REFUSED_HTTP)
        for new_tag in (0x04, 0x31, 0xA5, 0x1F):
            if new_tag != der[node.start]:
                body = der[: node.start] + bytes([new_tag]) + der[node.start + 1 :]
                yield Case(f"tag-{new_tag:02x}-{i}", body, Expect.ANY_DOCUMENTED)


def nesting() -> Iterator[Case]:
    """Deep nesting, definite and indefinite, past Python's recursion limit."""
    definite = b"\x05\x00"
    for _ in range(3000):
        definite = asn1.seq(definite)
    yield Case("nested-definite-3000", definite, Expect.REFUSED_HTTP)
    yield Case("nested-indefinite-30000", b"\x30\x80" * 30_000, Expect.REFUSED_HTTP)
    yield Case("nested-in-ber-set", b"\x31\x80" * 30_000, Expect.REFUSED_HTTP)


def signed_with(
    key: rsa.RSAPrivateKey,
    signer: x509.Certificate,
    content: bytes,
    message_type: str = MessageType.PKCS_REQ,
) -> bytes:
    """`content` (an envelope) in a fresh, validly signed pkiMessage."""
    attrs = client.build_signed_attributes(
        content=content,
        digest="sha256",
        message_type=message_type,
        transaction_id=secrets.token_hex(16),
        sender_nonce=cms.random_nonce(),
    )
    return client.sign_pki_message(
        content=content, signed_attrs=attrs, key=key, signer_cert=signer, digest="sha256"
    )


def sealed(
    content: bytes, ra: x509.Certificate, recipient_id: bytes, cipher: str = "aes256"
) -> bytes:
    """`content` encrypted to the RA's key, the recipient named by `recipient_id`."""
    key = ra.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    return cms.seal(
        content, recipient_key=key, recipient_id=recipient_id, cipher=CIPHERS_BY_NAME[cipher]
    )


def ra_id(ra: x509.Certificate) -> bytes:
    """The RA's IssuerAndSerialNumber, as clients write it."""
    return cms.issuer_and_serial(ra.issuer.public_bytes(), ra.serial_number)


# Recipient issuer names asn1crypto cannot read (or reads but cannot compare): an empty RDN,
# a string of the wrong tag, an attribute value that is no string, an unknown string type.
BROKEN_ISSUERS = {
    "empty-rdn": asn1.seq(asn1.set_of()),
    "cn-as-integer": asn1.seq(asn1.set_of(asn1.seq(asn1.oid("2.5.4.3"), asn1.integer(7)))),
    "cn-bad-utf8": asn1.seq(asn1.set_of(asn1.seq(asn1.oid("2.5.4.3"), b"\x0c\x02\xff\xfe"))),
    "cn-bmp-odd": asn1.seq(asn1.set_of(asn1.seq(asn1.oid("2.5.4.3"), b"\x1e\x03abc"))),
    "rdn-not-a-set": asn1.seq(asn1.seq(asn1.seq(asn1.oid("2.5.4.3"), b"\x13\x01a"))),
    "atv-empty": asn1.seq(asn1.set_of(asn1.seq())),
    "not-a-name": asn1.integer(5),
}


def csr_with_subject(k: rsa.RSAPrivateKey, subject_der: bytes, challenge: str) -> bytes:
    """A correctly self-signed CSR around any subject bytes (asn1.py: no checks)."""
    spki = k.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    attrs = asn1.explicit(
        0, asn1.attribute(asn1.OID_CHALLENGE_PASSWORD, asn1.printable_string(challenge))
    )
    info = asn1.seq(asn1.integer(0), subject_der, spki, attrs)
    signature = k.sign(info, padding.PKCS1v15(), hashes.SHA256())
    algorithm = asn1.algorithm_identifier("1.2.840.113549.1.1.11")
    return asn1.seq(info, algorithm, asn1.tlv(0x03, b"\x00" + signature))
