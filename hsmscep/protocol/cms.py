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

from asn1crypto import cms as asn1_cms
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hsmscep.errors import MessageError, UnsupportedAlgorithm
from hsmscep.protocol import asn1, der
from hsmscep.protocol.algorithms import (
    CIPHERS,
    DIGESTS_BY_NAME,
    ContentCipher,
    Digest,
    digest_by_oid,
)


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
    issuer_der: bytes
    serial: int
    subject_key_id: bytes | None

    @classmethod
    def of(cls, cert_der: bytes) -> CertId:
        cert = asn1_x509.Certificate.load(cert_der)
        issuer = cert.issuer
        return cls(issuer, issuer.dump(), cert.serial_number, cert.key_identifier)


@dataclass(frozen=True, slots=True)
class Recipient:
    """Who a KeyTransRecipientInfo is addressed to: issuer+serial, or a subject key id."""

    issuer_der: bytes | None
    serial: int | None
    subject_key_id: bytes | None

    def matches(self, cert: CertId) -> bool:
        if self.subject_key_id is not None:
            return cert.subject_key_id == self.subject_key_id
        if cert.serial != self.serial or self.issuer_der is None:
            return False
        if self.issuer_der == cert.issuer_der:
            return True
        # Clients re-encode the issuer (PrintableString vs UTF8String): compare semantically.
        # asn1crypto parses the name lazily, here: one it cannot read names none of ours.
        try:
            return bool(asn1_x509.Name.load(self.issuer_der) == cert.issuer)
        except (ValueError, TypeError, KeyError, IndexError, RecursionError):
            return False


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


def decode_envelope(data: bytes) -> Envelope:
    """Parse a pkcsPKIEnvelope (ContentInfo of EnvelopedData)."""
    with der.malformed("envelope"):
        return _decode_envelope(data)


_OID_ENVELOPED_DATA = asn1.oid_content(asn1.OID_ENVELOPED_DATA)


def _decode_envelope(data: bytes) -> Envelope:
    enveloped = der.content_info(data, _OID_ENVELOPED_DATA, "envelope")
    fields = der.children(data, der.expect(data, enveloped, der.SEQUENCE, "EnvelopedData"))
    fields = [f for f in fields if f.tag not in (0xA0, 0xA1)]  # originatorInfo, unprotected
    if len(fields) != 3:
        raise MessageError("EnvelopedData is incomplete")
    recipients: list[KeyTransport] = []
    for ri in der.children(data, der.expect(data, fields[1], der.SET, "recipientInfos")):
        if ri.tag != der.SEQUENCE:
            continue  # KARI/KEKRI/PWRI/other: nothing of ours can open them
        version, rid, key_alg, encrypted_key = der.children(data, ri)[:4]
        if rid.tag == der.SEQUENCE:
            issuer, serial = der.children(data, rid)[:2]
            serial_value = int.from_bytes(der.value(data, serial), "big", signed=True)
            recipient = Recipient(der.raw(data, issuer), serial_value, None)
        else:
            recipient = Recipient(None, None, der.value(data, rid))
        key = der.value(data, der.expect(data, encrypted_key, der.OCTET_STRING, "encryptedKey"))
        recipients.append(KeyTransport(recipient, key, _key_transport(data, key_alg)))
    if not recipients:
        raise MessageError("envelope has no key-transport recipient")
    eci = der.children(data, der.expect(data, fields[2], der.SEQUENCE, "EncryptedContentInfo"))
    if len(eci) != 3:
        raise MessageError("encrypted content missing")
    alg = der.children(data, der.expect(data, eci[1], der.SEQUENCE, "contentEncryptionAlgorithm"))
    cipher_oid = der.dotted(der.oid_bytes(data, alg[0], "content cipher"))
    cipher = CIPHERS.get(cipher_oid)
    if cipher is None:
        raise UnsupportedAlgorithm(f"unsupported content encryption {cipher_oid}")
    if len(alg) != 2 or alg[1].tag != der.OCTET_STRING:
        raise MessageError("content encryption IV missing")
    if eci[2].tag & ~0x20 != 0x80:
        raise MessageError("encrypted content missing")
    # Go's pkcs7 (micromdm's scepclient) sends [0] constructed, holding OCTET STRING
    # segments, as BER allows; der.value concatenates them.
    ciphertext = der.value(data, eci[2])
    return Envelope(tuple(recipients), cipher, der.value(data, alg[1]), ciphertext)


def _key_transport(data: bytes, key_alg: der.Tlv) -> OaepParams | None:
    parts = der.children(data, der.expect(data, key_alg, der.SEQUENCE, "keyEncryptionAlgorithm"))
    dotted = der.dotted(der.oid_bytes(data, parts[0], "key transport"))
    if dotted == asn1.OID_RSA_ENCRYPTION:
        return None
    if dotted != asn1.OID_RSAES_OAEP:
        raise UnsupportedAlgorithm(f"unsupported key transport {dotted}")
    params = asn1_cms.KeyEncryptionAlgorithm.load(der.raw(data, key_alg))["parameters"]
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


def crls_only(crls_der: Sequence[bytes]) -> bytes:
    """A degenerate SignedData carrying only CRLs in its [1] crls field (RFC 8894 §3.3.2)."""
    signed = asn1.seq(
        asn1.integer(1),
        asn1.set_of(),
        asn1.seq(asn1.oid(asn1.OID_DATA)),
        asn1.tlv(0xA1, b"".join(crls_der)),  # [1] IMPLICIT SET OF CertificateList
        asn1.set_of(),
    )
    return asn1.seq(asn1.oid(asn1.OID_SIGNED_DATA), asn1.explicit(0, signed))


@dataclass(frozen=True, slots=True)
class IssuerAndSerial:
    """The IssuerAndSerialNumber a GetCert or GetCRL envelope carries (RFC 8894 §3.3.3)."""

    issuer_der: bytes
    serial: int

    def issued_by(self, subject_der: bytes) -> bool:
        """Whether `subject_der` names the issuer, by the RFC 5280 §7.1 comparison."""
        if self.issuer_der == subject_der:
            return True
        with der.malformed("issuer name"):
            return bool(asn1_x509.Name.load(self.issuer_der) == asn1_x509.Name.load(subject_der))


def decode_issuer_and_serial(data: bytes) -> IssuerAndSerial:
    """Parse an IssuerAndSerialNumber (RFC 5652 §10.2.4); MessageError if malformed."""
    with der.malformed("IssuerAndSerialNumber"):
        parsed = asn1_cms.IssuerAndSerialNumber.load(data, strict=True)
        issuer = parsed["issuer"]
        issuer.native  # noqa: B018 - forces parsing now, inside the malformed() guard
        return IssuerAndSerial(issuer.dump(), parsed["serial_number"].native)


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
