"""CMS mechanics for SCEP: open a pkcsPKIEnvelope, seal one, and assemble SignedData. No I/O.

Parsing uses asn1crypto; building writes DER directly (asn1.py), since responses are built
on the hot path and their shape is fixed. The private-key steps (CEK decryption, signing)
are parameters: callers pass bytes in and get bytes out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from asn1crypto import cms, parser
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hsmscep import asn1
from hsmscep.algorithms import CIPHERS, DIGESTS_BY_NAME, ContentCipher, Digest, digest_by_oid
from hsmscep.errors import MessageError


@dataclass(frozen=True, slots=True)
class OaepParams:
    """RSAES-OAEP parameters (RFC 8017 A.2.1); the defaults are SHA-1 and MGF1-SHA-1."""

    hash_name: str = "sha1"
    mgf_hash_name: str = "sha1"
    label: bytes = b""

    def padding(self) -> padding.OAEP:
        return padding.OAEP(
            mgf=padding.MGF1(DIGESTS_BY_NAME[self.mgf_hash_name].hash()),
            algorithm=DIGESTS_BY_NAME[self.hash_name].hash(),
            label=self.label or None,
        )


@dataclass(frozen=True, slots=True)
class CertId:
    """The identifiers a RecipientInfo may use for one of our certificates."""

    issuer: Any  # asn1crypto x509.Name: its equality is the RFC 5280 §7.1 comparison
    serial: int
    subject_key_id: bytes | None

    @classmethod
    def of(cls, cert_der: bytes) -> CertId:
        cert = asn1_x509.Certificate.load(cert_der)
        return cls(cert.issuer, cert.serial_number, cert.key_identifier)


@dataclass(frozen=True, slots=True)
class Recipient:
    """Who a KeyTransRecipientInfo is addressed to: issuer+serial, or a subject key id."""

    issuer: Any
    serial: int | None
    subject_key_id: bytes | None

    def matches(self, cert: CertId) -> bool:
        if self.subject_key_id is not None:
            return cert.subject_key_id == self.subject_key_id
        # Clients re-encode the issuer (PrintableString vs UTF8String): compare semantically.
        return cert.serial == self.serial and cert.issuer == self.issuer


@dataclass(frozen=True, slots=True)
class KeyTransport:
    recipient: Recipient
    encrypted_key: bytes
    oaep: OaepParams | None  # None means RSAES-PKCS1-v1_5


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed pkcsPKIEnvelope, waiting for its content-encryption key."""

    recipients: tuple[KeyTransport, ...]
    cipher: ContentCipher
    iv: bytes
    ciphertext: bytes

    def open(self, cek: bytes) -> bytes:
        return self.cipher.decrypt(cek, self.iv, self.ciphertext)


class UnsupportedAlgorithm(MessageError):
    """The envelope uses an algorithm we refuse (answered with badAlg, not badMessageCheck)."""


def decode_envelope(der: bytes) -> Envelope:
    """Parse a pkcsPKIEnvelope (ContentInfo of EnvelopedData)."""
    try:
        return _decode_envelope(der)
    except MessageError:
        raise
    except RecursionError:
        raise MessageError("envelope nests too deeply") from None
    except Exception as exc:
        raise MessageError(f"malformed envelope ({type(exc).__name__})") from None


def _decode_envelope(der: bytes) -> Envelope:
    info = cms.ContentInfo.load(der, strict=True)
    if info["content_type"].dotted != asn1.OID_ENVELOPED_DATA:
        raise MessageError("pkcsPKIEnvelope is not EnvelopedData")
    enveloped = info["content"]
    recipients: list[KeyTransport] = []
    for ri in enveloped["recipient_infos"]:
        if ri.name != "ktri":
            continue  # KARI/KEKRI/PWRI: nothing of ours can open them
        ktri = ri.chosen
        rid = ktri["rid"]
        if rid.name == "issuer_and_serial_number":
            ias = rid.chosen
            recipient = Recipient(ias["issuer"], ias["serial_number"].native, None)
        else:
            recipient = Recipient(None, None, rid.chosen.native)
        recipients.append(
            KeyTransport(recipient, ktri["encrypted_key"].native, _key_transport(ktri))
        )
    if not recipients:
        raise MessageError("envelope has no key-transport recipient")
    eci = enveloped["encrypted_content_info"]
    alg = eci["content_encryption_algorithm"]
    cipher = CIPHERS.get(alg["algorithm"].dotted)
    if cipher is None:
        raise UnsupportedAlgorithm(f"unsupported content encryption {alg['algorithm'].dotted}")
    iv = alg["parameters"].native
    if not isinstance(iv, bytes):
        raise MessageError("content encryption IV missing")
    ciphertext = _encrypted_content(eci.contents)
    return Envelope(tuple(recipients), cipher, iv, ciphertext)


def _encrypted_content(eci_contents: bytes) -> bytes:
    """The [0] encryptedContent of an EncryptedContentInfo, primitive or constructed.

    Go's pkcs7 (micromdm's scepclient) sends it constructed, as BER allows: a [0] holding
    OCTET STRING segments, which asn1crypto's IMPLICIT OCTET STRING refuses to parse.
    """
    pointer = 0
    while pointer < len(eci_contents):
        rest = eci_contents[pointer:]
        cls, method, tag, _, contents, _ = parser.parse(rest)
        pointer += parser.peek(rest)
        if cls == 2 and tag == 0:  # context-specific [0]
            return contents if method == 0 else _octet_segments(contents, depth=0)
    raise MessageError("encrypted content missing")


def _octet_segments(data: bytes, depth: int) -> bytes:
    if depth > 8:
        raise MessageError("encrypted content nests too deeply")
    out = bytearray()
    pointer = 0
    while pointer < len(data):
        rest = data[pointer:]
        cls, method, tag, _, contents, _ = parser.parse(rest)
        pointer += parser.peek(rest)
        if (cls, tag) != (0, 4):
            raise MessageError("encrypted content segment is not an OCTET STRING")
        out += contents if method == 0 else _octet_segments(contents, depth + 1)
    return bytes(out)


def _key_transport(ktri: cms.KeyTransRecipientInfo) -> OaepParams | None:
    alg = ktri["key_encryption_algorithm"]
    dotted = alg["algorithm"].dotted
    if dotted == asn1.OID_RSA_ENCRYPTION:
        return None
    if dotted != asn1.OID_RSAES_OAEP:
        raise UnsupportedAlgorithm(f"unsupported key transport {dotted}")
    params = alg["parameters"]
    if params.native is None:
        return OaepParams()
    hash_name = digest_by_oid(params["hash_algorithm"]["algorithm"].dotted).name
    mgf = params["mask_gen_algorithm"]
    if mgf["algorithm"].dotted != asn1.OID_MGF1:
        raise UnsupportedAlgorithm("OAEP mask generation must be MGF1")
    mgf_hash = digest_by_oid(mgf["parameters"]["algorithm"].dotted).name
    label = params["p_source_algorithm"]["parameters"].native or b""
    return OaepParams(hash_name, mgf_hash, label)


# ---- building ---------------------------------------------------------------------------


def _oaep_algorithm(oaep: OaepParams) -> bytes:
    if oaep == OaepParams():
        return asn1.algorithm_identifier(asn1.OID_RSAES_OAEP, asn1.seq())
    hash_alg = asn1.algorithm_identifier(DIGESTS_BY_NAME[oaep.hash_name].oid)
    mgf_hash = asn1.algorithm_identifier(DIGESTS_BY_NAME[oaep.mgf_hash_name].oid)
    parts = [
        asn1.explicit(0, hash_alg),
        asn1.explicit(1, asn1.algorithm_identifier(asn1.OID_MGF1, mgf_hash)),
    ]
    if oaep.label:
        p_specified = asn1.algorithm_identifier(
            "1.2.840.113549.1.1.9", asn1.octet_string(oaep.label)
        )
        parts.append(asn1.explicit(2, p_specified))
    return asn1.algorithm_identifier(asn1.OID_RSAES_OAEP, asn1.seq(*parts))


def issuer_and_serial(issuer_der: bytes, serial: int) -> bytes:
    return asn1.seq(issuer_der, asn1.integer(serial))


def seal(
    content: bytes,
    *,
    recipient_key: rsa.RSAPublicKey,
    recipient_id: bytes,
    cipher: ContentCipher,
    oaep: OaepParams | None = None,
) -> bytes:
    """Encrypt content to one RSA recipient: a ContentInfo of EnvelopedData (RFC 5652 §6)."""
    key, iv, ciphertext = cipher.encrypt(content)
    if oaep is None:
        encrypted_key = recipient_key.encrypt(key, padding.PKCS1v15())
        key_alg = asn1.algorithm_identifier(asn1.OID_RSA_ENCRYPTION)
    else:
        encrypted_key = recipient_key.encrypt(key, oaep.padding())
        key_alg = _oaep_algorithm(oaep)
    ktri = asn1.seq(asn1.integer(0), recipient_id, key_alg, asn1.octet_string(encrypted_key))
    eci = asn1.seq(
        asn1.oid(asn1.OID_DATA),
        asn1.algorithm_identifier(cipher.oid, asn1.octet_string(iv)),
        asn1.tlv(0x80, ciphertext),  # [0] IMPLICIT OCTET STRING
    )
    enveloped = asn1.seq(asn1.integer(0), asn1.set_of(ktri), eci)
    return asn1.seq(asn1.oid(asn1.OID_ENVELOPED_DATA), asn1.explicit(0, enveloped))


def certs_only(certs_der: Sequence[bytes]) -> bytes:
    """A degenerate certificates-only SignedData (RFC 8894 §3.4), certificates in given order.

    The SET OF is deliberately left unsorted: Apple pairs the first certificate with its key
    (interop-quirks #7), and GetCACert clients expect the CA first.
    """
    signed = asn1.seq(
        asn1.integer(1),
        asn1.set_of(),
        asn1.seq(asn1.oid(asn1.OID_DATA)),
        asn1.explicit(0, b"".join(certs_der)),
        asn1.set_of(),
    )
    return asn1.seq(asn1.oid(asn1.OID_SIGNED_DATA), asn1.explicit(0, signed))


def signed_data(
    *,
    content: bytes | None,
    digest: Digest,
    signed_attrs: bytes,
    signature: bytes,
    signature_algorithm: bytes,
    signer_id: bytes,
    certs_der: Sequence[bytes],
) -> bytes:
    """Assemble a ContentInfo of SignedData around an already computed signature.

    `signed_attrs` is the SET OF encoding that was signed; inside SignerInfo it carries the
    [0] IMPLICIT tag instead (RFC 5652 §5.3).
    """
    digest_alg = asn1.algorithm_identifier(digest.oid)
    encap = asn1.oid(asn1.OID_DATA)
    if content is not None:
        encap += asn1.explicit(0, asn1.octet_string(content))
    signer_info = asn1.seq(
        asn1.integer(1),
        signer_id,
        digest_alg,
        b"\xa0" + signed_attrs[1:],
        signature_algorithm,
        asn1.octet_string(signature),
    )
    body = asn1.seq(
        asn1.integer(1),
        asn1.set_of(digest_alg),
        asn1.seq(encap),
        asn1.explicit(0, b"".join(certs_der)),
        asn1.set_of(signer_info),
    )
    return asn1.seq(asn1.oid(asn1.OID_SIGNED_DATA), asn1.explicit(0, body))


def random_nonce() -> bytes:
    return os.urandom(16)
