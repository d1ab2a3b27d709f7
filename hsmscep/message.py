"""SCEP pkiMessage decoding and client-signature verification (RFC 8894 §3.2). No I/O.

`decode_pki_message` is the line between HTTP errors and signed CertReps: whatever it raises
(MessageError) is answered with HTTP 400, and once it returns, the transactionID and nonce
are authenticated and every outcome is a signed CertRep.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from asn1crypto import cms, core
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep import asn1
from hsmscep.algorithms import (
    ECDSA_SIGNATURE_DIGESTS,
    RSA_SIGNATURE_DIGESTS,
    Digest,
    digest_by_oid,
)
from hsmscep.errors import MessageError


class MessageType(StrEnum):
    CERT_REP = "3"
    RENEWAL_REQ = "17"
    PKCS_REQ = "19"
    CERT_POLL = "20"
    GET_CERT = "21"
    GET_CRL = "22"


class PkiStatus(StrEnum):
    SUCCESS = "0"
    FAILURE = "2"
    PENDING = "3"


class FailInfo(StrEnum):
    BAD_ALG = "0"
    BAD_MESSAGE_CHECK = "1"
    BAD_REQUEST = "2"
    BAD_TIME = "3"
    BAD_CERT_ID = "4"


MAX_TRANSACTION_ID = 256
MAX_NONCE = 256


@dataclass(frozen=True, slots=True)
class PkiRequest:
    """A pkiMessage whose signature over its signed attributes has verified."""

    message_type: str  # raw: an unknown value is answered with a signed badRequest
    transaction_id: str
    sender_nonce: bytes | None  # old IOS omits it (interop-quirks #13)
    digest: Digest
    signer_cert: x509.Certificate
    signer_issuer_der: bytes  # as encoded in the certificate, for the reply's RecipientInfo
    signer_serial: int
    content: bytes  # the encapsulated pkcsPKIEnvelope (ContentInfo DER), may be empty

    @property
    def signer_fingerprint(self) -> str:
        return hashlib.sha256(self.signer_cert.public_bytes(Encoding.DER)).hexdigest()


def decode_pki_message(der: bytes) -> PkiRequest:
    """Parse a pkiMessage and verify the client's signature; raise MessageError if it fails."""
    try:
        return _decode(der)
    except MessageError:
        raise
    except RecursionError:
        raise MessageError("message nests too deeply") from None
    except Exception as exc:  # asn1crypto raises ValueError/TypeError/KeyError/... on bad input
        raise MessageError(f"malformed pkiMessage ({type(exc).__name__})") from None


def _decode(der: bytes) -> PkiRequest:
    if not der:
        raise MessageError("empty message")
    info = cms.ContentInfo.load(der, strict=True)
    if info["content_type"].dotted != asn1.OID_SIGNED_DATA:
        raise MessageError("pkiMessage is not SignedData")
    signed_data = info["content"]
    signer_infos = signed_data["signer_infos"]
    if len(signer_infos) != 1:
        raise MessageError(f"expected one signerInfo, found {len(signer_infos)}")
    signer_info = signer_infos[0]

    signed_attrs = signer_info["signed_attrs"]
    if not signed_attrs:
        raise MessageError("signerInfo has no signed attributes")
    attrs = _single_valued_attributes(signed_attrs)
    digest = digest_by_oid(signer_info["digest_algorithm"]["algorithm"].dotted)

    content = _encapsulated_content(signed_data)
    message_digest = _required(attrs, asn1.OID_MESSAGE_DIGEST, "messageDigest")
    computed = hashlib.new(digest.name, content).digest()
    if not hmac.compare_digest(computed, message_digest):
        raise MessageError("messageDigest does not match the content")
    content_type = attrs.get(asn1.OID_CONTENT_TYPE)
    if content_type is not None and content_type != asn1.OID_DATA:
        raise MessageError("signed contentType is not id-data")

    cert_asn1 = _signer_certificate(signed_data, signer_info["sid"])
    cert = x509.load_der_x509_certificate(cert_asn1.dump())
    _verify_signature(cert, signer_info, signed_attrs, digest)

    message_type = _required(attrs, asn1.OID_MESSAGE_TYPE, "messageType")
    transaction_id = _required(attrs, asn1.OID_TRANSACTION_ID, "transactionID")
    if not 0 < len(transaction_id) <= MAX_TRANSACTION_ID:
        raise MessageError("transactionID length out of range")
    sender_nonce = attrs.get(asn1.OID_SENDER_NONCE)
    if sender_nonce is not None and len(sender_nonce) > MAX_NONCE:
        raise MessageError("senderNonce too long")
    tbs = cert_asn1["tbs_certificate"]
    return PkiRequest(
        message_type=message_type,
        transaction_id=transaction_id,
        sender_nonce=sender_nonce,
        digest=digest,
        signer_cert=cert,
        signer_issuer_der=tbs["issuer"].dump(),
        signer_serial=tbs["serial_number"].native,
        content=content,
    )


def _single_valued_attributes(signed_attrs: cms.CMSAttributes) -> dict[str, Any]:
    """Map OID -> native value, refusing duplicated or multi-valued SCEP attributes."""
    out: dict[str, Any] = {}
    for attr in signed_attrs:
        dotted = attr["type"].dotted
        if dotted in out:
            raise MessageError(f"attribute {dotted} appears twice")
        values = attr["values"]
        if len(values) != 1:
            raise MessageError(f"attribute {dotted} must have exactly one value")
        value = values[0]
        if isinstance(value, core.Any):  # an attribute nobody registered: keep it opaque
            out[dotted] = value.dump()
        elif dotted == asn1.OID_CONTENT_TYPE:
            out[dotted] = value.dotted
        else:
            native = value.native
            if dotted in _STRING_ATTRS and not isinstance(native, str):
                raise MessageError(f"attribute {dotted} has the wrong type")
            out[dotted] = native
    return out


_STRING_ATTRS = frozenset({asn1.OID_MESSAGE_TYPE, asn1.OID_TRANSACTION_ID})


def _required(attrs: dict[str, Any], dotted: str, name: str) -> Any:
    try:
        return attrs[dotted]
    except KeyError:
        raise MessageError(f"{name} attribute missing") from None


def _encapsulated_content(signed_data: cms.SignedData) -> bytes:
    encap = signed_data["encap_content_info"]
    if encap["content_type"].dotted != asn1.OID_DATA:
        raise MessageError("encapsulated content is not id-data")
    content = encap["content"]
    if content.native is None:
        return b""
    # Apple sends a constructed (BER) OCTET STRING; the digest covers the concatenated octets.
    value = content.native if isinstance(content.native, bytes) else content.contents
    if not isinstance(value, bytes):
        raise MessageError("encapsulated content is not an OCTET STRING")
    return value


def _signer_certificate(signed_data: cms.SignedData, sid: cms.SignerIdentifier) -> Any:
    certs = [c.chosen for c in signed_data["certificates"] or [] if c.name == "certificate"]
    if not certs:
        raise MessageError("no signer certificate in the message")
    if sid.name == "issuer_and_serial_number":
        want = sid.chosen
        for cert in certs:
            if (
                cert.serial_number == want["serial_number"].native
                and cert.issuer == want["issuer"]  # asn1crypto compares Names semantically
            ):
                return cert
    else:
        ski = sid.chosen.native
        for cert in certs:
            if cert.key_identifier == ski:
                return cert
    raise MessageError("signer certificate not found in the message")


def _verify_signature(
    cert: x509.Certificate,
    signer_info: cms.SignerInfo,
    signed_attrs: cms.CMSAttributes,
    digest: Digest,
) -> None:
    signature = signer_info["signature"].native
    sig_alg = signer_info["signature_algorithm"]
    sig_oid = sig_alg["algorithm"].dotted
    # The signature covers the SET OF encoding of the attributes as the client sent them
    # (RFC 5652 §5.4); DER re-encoding is only a fallback for clients that signed sorted
    # attributes but transmitted them unsorted.
    received = b"\x31" + signed_attrs.dump()[1:]
    candidates = [received]
    canonical = asn1.set_of(*(attr.dump(force=True) for attr in signed_attrs))
    if canonical != received:
        candidates.append(canonical)
    public_key = cert.public_key()
    for data in candidates:
        hashed = digest.hash()
        pre = hashlib.new(digest.name, data).digest()
        try:
            if isinstance(public_key, rsa.RSAPublicKey):
                if sig_oid == "1.2.840.113549.1.1.10":
                    pss = sig_alg["parameters"]
                    pss_hash = digest_by_oid(pss["hash_algorithm"]["algorithm"].dotted)
                    if pss_hash.name != digest.name:
                        raise MessageError("RSASSA-PSS hash differs from the digest algorithm")
                    pad: padding.AsymmetricPadding = padding.PSS(
                        padding.MGF1(pss_hash.hash()), pss["salt_length"].native
                    )
                elif sig_oid == asn1.OID_RSA_ENCRYPTION or (
                    RSA_SIGNATURE_DIGESTS.get(sig_oid) == digest.name
                ):
                    pad = padding.PKCS1v15()
                else:
                    raise MessageError(f"unsupported signature algorithm {sig_oid}")
                public_key.verify(signature, pre, pad, Prehashed(hashed))
            elif isinstance(public_key, ec.EllipticCurvePublicKey):
                if ECDSA_SIGNATURE_DIGESTS.get(sig_oid, digest.name) != digest.name:
                    raise MessageError(f"unsupported signature algorithm {sig_oid}")
                public_key.verify(signature, pre, ec.ECDSA(Prehashed(hashed)))
            else:
                raise MessageError("unsupported signer key type")
            return
        except InvalidSignature:
            continue
    raise MessageError("signature does not verify")
