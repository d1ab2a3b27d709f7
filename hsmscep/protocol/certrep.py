"""CertRep construction (RFC 8894 §3.3.2): the signed reply to every verified request. No I/O.

Signed attributes always carry contentType, messageDigest, messageType, pkiStatus,
transactionID, senderNonce and recipientNonce (plus failInfo on FAILURE): BouncyCastle,
Windows and iOS each fail on a missing one (interop-quirks #8).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.protocol import asn1, cms
from hsmscep.protocol.algorithms import DIGESTS_BY_NAME, ContentCipher
from hsmscep.protocol.codes import FailInfo, MessageType, PkiStatus
from hsmscep.protocol.keys import ExternalRsaKey
from hsmscep.protocol.message import PkiRequest

_RSA_SIGNATURE = asn1.algorithm_identifier(asn1.OID_RSA_ENCRYPTION)
# The signed attributes that never vary, encoded once.
_CONTENT_TYPE_DATA = asn1.attribute(asn1.OID_CONTENT_TYPE, asn1.oid(asn1.OID_DATA))
_MESSAGE_TYPE_CERT_REP = asn1.attribute(
    asn1.OID_MESSAGE_TYPE, asn1.printable_string(MessageType.CERT_REP.value)
)
_PKI_STATUS = {
    s: asn1.attribute(asn1.OID_PKI_STATUS, asn1.printable_string(s.value)) for s in PkiStatus
}
_FAIL_INFO = {
    f: asn1.attribute(asn1.OID_FAIL_INFO, asn1.printable_string(f.value)) for f in FailInfo
}


@dataclass(frozen=True, slots=True)
class ResponseSigner:
    """The RA signing certificate with its key, prepared once per worker."""

    cert_der: bytes
    signer_id: bytes  # IssuerAndSerialNumber DER
    key: ExternalRsaKey
    not_after: datetime | None = None  # a previous RA signs only while its certificate is valid

    @classmethod
    def of(cls, cert: x509.Certificate, key: ExternalRsaKey) -> ResponseSigner:
        der = cert.public_bytes(Encoding.DER)
        cert_id = cms.CertId.of(der)
        signer_id = cms.issuer_and_serial(cert_id.issuer.dump(), cert_id.serial)
        return cls(der, signer_id, key, cert.not_valid_after_utc)


def build_cert_rep(
    request: PkiRequest,
    signer: ResponseSigner,
    *,
    status: PkiStatus,
    fail_info: FailInfo | None = None,
    envelope: bytes | None = None,
    sender_nonce: bytes,
) -> bytes:
    """Sign a CertRep for `request`; `envelope` is the sealed degenerate PKCS#7 on SUCCESS."""
    digest = request.digest
    content = envelope or b""
    attrs = [
        _CONTENT_TYPE_DATA,
        asn1.attribute(asn1.OID_MESSAGE_DIGEST, asn1.octet_string(digest.compute(content))),
        _MESSAGE_TYPE_CERT_REP,
        _PKI_STATUS[status],
        asn1.attribute(asn1.OID_TRANSACTION_ID, _transaction_id(request.transaction_id)),
        asn1.attribute(asn1.OID_SENDER_NONCE, asn1.octet_string(sender_nonce)),
    ]
    if request.sender_nonce is not None:
        attrs.append(
            asn1.attribute(asn1.OID_RECIPIENT_NONCE, asn1.octet_string(request.sender_nonce))
        )
    if fail_info is not None:
        attrs.append(_FAIL_INFO[fail_info])
    signed_attrs = asn1.set_of(*attrs)
    to_sign = digest.digest_info_prefix + digest.compute(signed_attrs)
    return cms.signed_data(
        # FAILURE and PENDING carry an empty eContent rather than none: OpenSSL's PKCS7_verify
        # (certmonger, sscep) refuses a SignedData without content ("no content"), and the
        # messageDigest above is the digest of these empty bytes either way.
        content=content,
        digest=digest,
        signed_attrs=signed_attrs,
        signature=signer.key.sign_digest_info(to_sign),
        signature_algorithm=_RSA_SIGNATURE,
        signer_id=signer.signer_id,
        certs_der=(signer.cert_der,),
    )


def sign_next_ca_certs(certs_der: list[bytes], signer: ResponseSigner) -> bytes:
    """The GetNextCACert reply (RFC 8894 §4.7.1): a SignedData signed by the RA whose id-data
    content is the degenerate certs-only PKCS#7 of the next CA (and RA) certificates."""
    digest = DIGESTS_BY_NAME["sha256"]
    content = cms.certs_only(certs_der)
    signed_attrs = asn1.set_of(
        asn1.attribute(asn1.OID_CONTENT_TYPE, asn1.oid(asn1.OID_DATA)),
        asn1.attribute(
            asn1.OID_MESSAGE_DIGEST, asn1.octet_string(hashlib.sha256(content).digest())
        ),
    )
    to_sign = digest.digest_info_prefix + hashlib.sha256(signed_attrs).digest()
    return cms.signed_data(
        content=content,
        digest=digest,
        signed_attrs=signed_attrs,
        signature=signer.key.sign_digest_info(to_sign),
        signature_algorithm=_RSA_SIGNATURE,
        signer_id=signer.signer_id,
        certs_der=(signer.cert_der,),
    )


def _transaction_id(value: str) -> bytes:
    # RFC 8894 says PrintableString, but clients send hex, base64 ('+', '/', '=') and more;
    # echo the exact value, as UTF8String when PrintableString cannot carry it.
    if _PRINTABLE.fullmatch(value):
        return asn1.printable_string(value)
    return asn1.tlv(0x0C, value.encode())


# PrintableString's characters (X.680): one regex match, not a generator step per character.
_PRINTABLE = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]*")


def seal_certificates(
    certs_der: list[bytes],
    request: PkiRequest,
    cipher: ContentCipher,
    oaep: cms.OaepParams | None,
) -> bytes:
    """Encrypt a degenerate PKCS#7 of `certs_der` to the requester's signer certificate."""
    return seal_reply(cms.certs_only(certs_der), request, cipher, oaep)


def seal_reply(
    content: bytes,
    request: PkiRequest,
    cipher: ContentCipher,
    oaep: cms.OaepParams | None,
) -> bytes:
    """Encrypt a reply's degenerate PKCS#7 (certificates or CRLs) to the requester."""
    public_key = request.signer_key
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise TypeError("the requester's key cannot receive an RSA key transport")
    recipient = cms.issuer_and_serial(request.signer_issuer_der, request.signer_serial)
    return cms.seal(
        content,
        recipient_key=public_key,
        recipient_id=recipient,
        cipher=cipher,
        oaep=oaep,
    )
