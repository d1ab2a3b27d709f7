"""The client's reading of replies: verify a SignedData against the trusted CA/RA certificates,
open a CertRep answering a request (RFC 8894 §3.3), read a GetNextCACert reply (§4.7.1).

Verifies with asn1crypto and cryptography rather than the server's DER reader, so a round trip
checks one implementation against another. No I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from asn1crypto import cms as asn1_cms
from asn1crypto import core
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.errors import MessageError
from hsmscep.protocol import asn1, cms
from hsmscep.protocol.algorithms import RSA_SIGNATURE_DIGESTS, digest_by_oid
from hsmscep.protocol.codes import MessageType, PkiStatus
from hsmscep.testing.cacerts import parse_ca_certs
from hsmscep.testing.pkcs7 import malformed, pkcs7_certificates, pkcs7_crls
from hsmscep.testing.requests import ClientRequest

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SignedMessage:
    """A SignedData whose signature and messageDigest verified against a trusted certificate."""

    attributes: dict[str, object]  # OID -> native value (str, bytes; OIDs as dotted str)
    content: bytes  # the encapsulated content, b"" when absent
    signer_cert: x509.Certificate


@dataclass(frozen=True, slots=True)
class CertRepResult:
    pki_status: str  # "0" SUCCESS, "2" FAILURE, "3" PENDING
    fail_info: str | None
    certificates: list[x509.Certificate]  # decrypted degenerate PKCS#7 content (SUCCESS only)
    signer_cert: x509.Certificate
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)  # GetCRL replies


def parse_next_ca_certs(
    body: bytes, ra_certs: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """A GetNextCACert reply: verify its signature by one of the current `ra_certs`
    (RFC 8894 §4.7.1), then the next CA (and RA) certificates it carries."""
    signed = verify_signed_message(body, ra_certs)
    return parse_ca_certs(signed.content)


def verify_signed_message(der: bytes, trusted: Sequence[x509.Certificate]) -> SignedMessage:
    """Verify a SignedData signed by one of `trusted` (RSA PKCS#1 v1.5); else MessageError."""
    with malformed("SignedData"):
        info = asn1_cms.ContentInfo.load(der, strict=True)
        if info["content_type"].dotted != asn1.OID_SIGNED_DATA:
            raise MessageError("response is not SignedData")
        signed_data = info["content"]
        if len(signed_data["signer_infos"]) != 1:
            raise MessageError("response must have exactly one signerInfo")
        signer_info = signed_data["signer_infos"][0]
        sid = signer_info["sid"]
        if sid.name == "issuer_and_serial_number":
            wanted = cms.Recipient(
                sid.chosen["issuer"].dump(), sid.chosen["serial_number"].native, None
            )
        else:
            wanted = cms.Recipient(None, None, sid.chosen.native)
        # The signer is looked up among the trusted certificates only: an embedded certificate
        # with the same issuer and serial proves nothing.
        signer = next(
            (c for c in trusted if wanted.matches(cms.CertId.of(c.public_bytes(Encoding.DER)))),
            None,
        )
        if signer is None:
            raise MessageError("response signer is not one of the trusted CA/RA certificates")
        digest = digest_by_oid(signer_info["digest_algorithm"]["algorithm"].dotted)
        sig_oid = signer_info["signature_algorithm"]["algorithm"].dotted
        if sig_oid != asn1.OID_RSA_ENCRYPTION and RSA_SIGNATURE_DIGESTS.get(sig_oid) != digest.name:
            raise MessageError(f"unsupported signature algorithm {sig_oid}")
        public_key = signer.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise MessageError("response signer has no RSA key")
        signed_attrs = signer_info["signed_attrs"]
        if not signed_attrs:
            raise MessageError("response has no signed attributes")
        # The signature covers the attributes' SET OF encoding, not their [0] IMPLICIT one.
        signed = b"\x31" + signed_attrs.dump()[1:]
        signature = signer_info["signature"].native
        try:
            public_key.verify(signature, signed, padding.PKCS1v15(), digest.hash())
        except InvalidSignature:
            raise MessageError("response signature does not verify") from None
        attributes = _attributes(signed_attrs)
        content = signed_data["encap_content_info"]["content"].native or b""
        if not isinstance(content, bytes):
            raise MessageError("encapsulated content is not an OCTET STRING")
        if attributes.get(asn1.OID_MESSAGE_DIGEST) != hashlib.new(digest.name, content).digest():
            raise MessageError("messageDigest does not match the content")
        if attributes.get(asn1.OID_CONTENT_TYPE) != asn1.OID_DATA:
            raise MessageError("signed contentType is missing or not id-data")
        return SignedMessage(attributes, content, signer)


def open_cert_rep(
    der: bytes, request: ClientRequest, ca_certs: Sequence[x509.Certificate]
) -> CertRepResult:
    """Verify a CertRep answering `request` and, on SUCCESS, decrypt its certificates."""
    signed = verify_signed_message(der, ca_certs)
    attrs = signed.attributes
    message_type = _required(attrs, asn1.OID_MESSAGE_TYPE, "messageType", str)
    if message_type != MessageType.CERT_REP:
        raise MessageError(f"messageType is {message_type!r}, not CertRep (3)")
    if _required(attrs, asn1.OID_TRANSACTION_ID, "transactionID", str) != request.transaction_id:
        raise MessageError("transactionID does not match the request")
    # RFC 8894 §3.2.1.5: the recipientNonce echoes the senderNonce of the request.
    if _required(attrs, asn1.OID_RECIPIENT_NONCE, "recipientNonce", bytes) != request.sender_nonce:
        raise MessageError("recipientNonce does not match the request's senderNonce")
    _required(attrs, asn1.OID_SENDER_NONCE, "senderNonce", bytes)
    status = _required(attrs, asn1.OID_PKI_STATUS, "pkiStatus", str)
    fail_info = attrs.get(asn1.OID_FAIL_INFO)
    if fail_info is not None and not isinstance(fail_info, str):
        raise MessageError("failInfo has the wrong type")
    certificates: list[x509.Certificate] = []
    crls: list[x509.CertificateRevocationList] = []
    if status == PkiStatus.SUCCESS:
        certificates, crls = _decrypt_reply(signed.content, request)
    elif status == PkiStatus.FAILURE:
        if fail_info is None:
            raise MessageError("FAILURE CertRep without failInfo")
    elif status != PkiStatus.PENDING:
        raise MessageError(f"unknown pkiStatus {status!r}")
    return CertRepResult(status, fail_info, certificates, signed.signer_cert, crls)


def _decrypt_reply(
    content: bytes, request: ClientRequest
) -> tuple[list[x509.Certificate], list[x509.CertificateRevocationList]]:
    envelope = cms.decode_envelope(content)
    me = cms.CertId.of(request.signer_cert.public_bytes(Encoding.DER))
    ours = next((kt for kt in envelope.recipients if kt.recipient.matches(me)), None)
    if ours is None:
        raise MessageError("the CertRep envelope is not addressed to our signer certificate")
    pad = padding.PKCS1v15() if ours.oaep is None else ours.oaep.padding()
    try:
        cek = request.key.decrypt(ours.encrypted_key, pad)
    except ValueError:
        raise MessageError("cannot decrypt the content-encryption key") from None
    degenerate = envelope.open(cek)
    certificates = pkcs7_certificates(degenerate, "CertRep certificate set")
    crls = pkcs7_crls(degenerate, "CertRep CRL set")
    if not certificates and not crls:
        raise MessageError("SUCCESS CertRep carries no certificate")
    return certificates, crls


def _attributes(signed_attrs: asn1_cms.CMSAttributes) -> dict[str, object]:
    out: dict[str, object] = {}
    for attr in signed_attrs:
        dotted = attr["type"].dotted
        if dotted in out or len(attr["values"]) != 1:
            raise MessageError(f"attribute {dotted} is repeated or not single-valued")
        value = attr["values"][0]
        out[dotted] = value.dotted if isinstance(value, core.ObjectIdentifier) else value.native
    return out


def _required(attrs: dict[str, object], dotted: str, name: str, kind: type[T]) -> T:
    value = attrs.get(dotted)
    if not isinstance(value, kind):
        raise MessageError(f"{name} attribute missing or of the wrong type")
    return value
