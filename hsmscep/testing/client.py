"""A SCEP client for tests and the benchmark: build pkiMessages, open CertReps (RFC 8894 §3).

Reuses the server's DER builders (asn1.py, cms.py) but verifies responses with its own small
reader, so a round trip checks one implementation against another. No I/O; the only
side inputs are fresh randomness and the clock (for the self-signed signer certificate).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from asn1crypto import cms as asn1_cms
from asn1crypto import core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtensionOID

from hsmscep.errors import MessageError
from hsmscep.protocol import asn1, cms
from hsmscep.protocol.algorithms import (
    CIPHERS_BY_NAME,
    DIGESTS_BY_NAME,
    RSA_SIGNATURE_DIGESTS,
    Digest,
    digest_by_oid,
)
from hsmscep.protocol.codes import MessageType, PkiStatus

T = TypeVar("T")

_RSA_SIGNATURE_OIDS = {name: dotted for dotted, name in RSA_SIGNATURE_DIGESTS.items()}


@dataclass(frozen=True, slots=True)
class ClientRequest:
    der: bytes  # the pkiMessage DER
    transaction_id: str
    sender_nonce: bytes
    key: rsa.RSAPrivateKey  # client key (also the CSR key unless a CSR was given)
    signer_cert: x509.Certificate


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


# ---- GetCACert ----------------------------------------------------------------------------


def parse_ca_certs(body: bytes) -> list[x509.Certificate]:
    """A GetCACert body: one DER certificate, or a degenerate PKCS#7 (order preserved)."""
    try:
        return [x509.load_der_x509_certificate(body)]
    except ValueError:
        pass
    certs = _pkcs7_certificates(body, "GetCACert response")
    if not certs:
        raise MessageError("GetCACert response carries no certificate")
    return certs


def parse_next_ca_certs(
    body: bytes, ra_certs: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """A GetNextCACert reply: verify its signature by one of the current `ra_certs`
    (RFC 8894 §4.7.1), then the next CA (and RA) certificates it carries."""
    signed = verify_signed_message(body, ra_certs)
    return parse_ca_certs(signed.content)


def select_recipient(ca_certs: Sequence[x509.Certificate]) -> x509.Certificate:
    """The certificate to encrypt to: an RA with keyEncipherment, else the CA (RFC 8894 §3.5.1)."""
    if not ca_certs:
        raise MessageError("no CA certificates to encrypt to")
    for cert in ca_certs:
        if not _is_ca(cert) and _key_encipherment(cert):
            return cert
    for cert in ca_certs:
        if _is_ca(cert):
            return cert
    return ca_certs[0]  # a v1 CA certificate without extensions


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _key_encipherment(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    except x509.ExtensionNotFound:
        return False


# ---- requests -----------------------------------------------------------------------------


def build_csr(
    key: rsa.RSAPrivateKey,
    subject: x509.Name,
    *,
    challenge: str | None,
    sans: Sequence[x509.GeneralName] = (),
    digest: str = "sha256",
    challenge_as_utf8: bool = False,
    template_name: str | None = None,
) -> bytes:
    """A PKCS#10 request (RFC 2986) with challengePassword and a SAN extension request,
    and the Microsoft certificate template name extension (a BMPString) if given.

    Written with asn1.py rather than cryptography's builder, which refuses SHA-1 and writes
    the challenge as UTF8String; most clients send PrintableString (interop-quirks #13).
    PrintableString's character set is not checked, as real clients do not check it either.
    """
    attrs = []
    if challenge is not None:
        if challenge_as_utf8:
            value = asn1.tlv(0x0C, challenge.encode())
        else:
            value = asn1.printable_string(challenge)
        attrs.append(asn1.attribute(asn1.OID_CHALLENGE_PASSWORD, value))
    extensions = []
    if sans:
        san = x509.SubjectAlternativeName(sans).public_bytes()
        extensions.append(
            asn1.seq(
                asn1.oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string),
                asn1.octet_string(san),
            )
        )
    if template_name is not None:
        bmp = asn1.tlv(0x1E, template_name.encode("utf-16-be"))
        extensions.append(
            asn1.seq(asn1.oid(asn1.OID_MS_CERT_TEMPLATE_NAME), asn1.octet_string(bmp))
        )
    if extensions:
        attrs.append(asn1.attribute(asn1.OID_EXTENSION_REQUEST, asn1.seq(*extensions)))
    spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    attributes = asn1.explicit(0, b"".join(sorted(attrs)))  # [0] IMPLICIT SET OF Attribute
    info = asn1.seq(asn1.integer(0), subject.public_bytes(), spki, attributes)
    signature = key.sign(info, padding.PKCS1v15(), _digest(digest).hash())
    algorithm = asn1.algorithm_identifier(_RSA_SIGNATURE_OIDS[digest])
    return asn1.seq(info, algorithm, asn1.tlv(0x03, b"\x00" + signature))


def self_signed_signer(key: rsa.RSAPrivateKey, subject: x509.Name) -> x509.Certificate:
    """The throwaway signer certificate an enrolling client makes for itself (one day)."""
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def build_signed_attributes(
    *,
    content: bytes,
    digest: str,
    message_type: str,
    transaction_id: str,
    sender_nonce: bytes,
    extra: Sequence[bytes] = (),
) -> bytes:
    """The SET OF signed attributes of a request (RFC 8894 §3.2.1); `extra` are Attribute DERs."""
    message_digest = hashlib.new(_digest(digest).name, content).digest()
    return asn1.set_of(
        asn1.attribute(asn1.OID_CONTENT_TYPE, asn1.oid(asn1.OID_DATA)),
        asn1.attribute(asn1.OID_MESSAGE_DIGEST, asn1.octet_string(message_digest)),
        asn1.attribute(asn1.OID_MESSAGE_TYPE, asn1.printable_string(message_type)),
        asn1.attribute(asn1.OID_TRANSACTION_ID, asn1.printable_string(transaction_id)),
        asn1.attribute(asn1.OID_SENDER_NONCE, asn1.octet_string(sender_nonce)),
        *extra,
    )


def sign_pki_message(
    *,
    content: bytes,
    signed_attrs: bytes,
    key: rsa.RSAPrivateKey,
    signer_cert: x509.Certificate,
    digest: str,
) -> bytes:
    """Sign `signed_attrs` exactly as given (rsaEncryption) and wrap them in SignedData."""
    algorithm = _digest(digest)
    return cms.signed_data(
        content=content,
        digest=algorithm,
        signed_attrs=signed_attrs,
        signature=key.sign(signed_attrs, padding.PKCS1v15(), algorithm.hash()),
        signature_algorithm=asn1.algorithm_identifier(asn1.OID_RSA_ENCRYPTION),
        signer_id=_issuer_and_serial(signer_cert),
        certs_der=[signer_cert.public_bytes(Encoding.DER)],
    )


def build_pkcs_req(
    *,
    key: rsa.RSAPrivateKey,
    ca_certs: Sequence[x509.Certificate],
    challenge: str | None,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName] = (),
    digest: str = "sha256",
    cipher: str = "aes256",
    signer_cert: x509.Certificate | None = None,
    transaction_id: str | None = None,
    message_type: str = MessageType.PKCS_REQ,
    oaep: bool = False,
    csr: bytes | None = None,
    challenge_as_utf8: bool = False,
    template_name: str | None = None,
) -> ClientRequest:
    """A signed PKCSReq (or RenewalReq with `message_type="17"`) around an encrypted CSR."""
    content_cipher = CIPHERS_BY_NAME.get(cipher)
    if content_cipher is None:
        raise ValueError(f"unknown cipher {cipher!r}; choose from {sorted(CIPHERS_BY_NAME)}")
    recipient = select_recipient(ca_certs)
    recipient_key = recipient.public_key()
    if not isinstance(recipient_key, rsa.RSAPublicKey):
        raise MessageError("the CA/RA recipient certificate has no RSA key")
    if csr is None:
        csr = build_csr(
            key,
            subject,
            challenge=challenge,
            sans=sans,
            digest=digest,
            challenge_as_utf8=challenge_as_utf8,
            template_name=template_name,
        )
    envelope = cms.seal(
        csr,
        recipient_key=recipient_key,
        recipient_id=_issuer_and_serial(recipient),
        cipher=content_cipher,
        oaep=cms.OaepParams() if oaep else None,
    )
    if signer_cert is None:
        signer_cert = self_signed_signer(key, subject)
    transaction_id = transaction_id or secrets.token_hex(16)
    sender_nonce = cms.random_nonce()
    signed_attrs = build_signed_attributes(
        content=envelope,
        digest=digest,
        message_type=message_type,
        transaction_id=transaction_id,
        sender_nonce=sender_nonce,
    )
    der = sign_pki_message(
        content=envelope, signed_attrs=signed_attrs, key=key, signer_cert=signer_cert, digest=digest
    )
    return ClientRequest(der, transaction_id, sender_nonce, key, signer_cert)


def build_cert_query(
    *,
    key: rsa.RSAPrivateKey,
    ca_certs: Sequence[x509.Certificate],
    issuer: x509.Certificate,
    serial: int,
    message_type: str = MessageType.GET_CERT,
    signer_cert: x509.Certificate | None = None,
    subject: x509.Name | None = None,
) -> ClientRequest:
    """A GetCert (21) or GetCRL (22) for `serial` issued by `issuer` (RFC 8894 §3.3.3-4).

    The envelope carries an IssuerAndSerialNumber, the issuer as encoded in the CA certificate.
    """
    tbs = asn1_x509.Certificate.load(issuer.public_bytes(Encoding.DER))["tbs_certificate"]
    query = cms.issuer_and_serial(tbs["subject"].dump(), serial)
    return build_pkcs_req(
        key=key,
        ca_certs=ca_certs,
        challenge=None,
        subject=subject or x509.Name.from_rfc4514_string("CN=hsmscep query"),
        signer_cert=signer_cert,
        message_type=message_type,
        csr=query,
    )


def build_cert_poll(
    *,
    key: rsa.RSAPrivateKey,
    ca_certs: Sequence[x509.Certificate],
    transaction_id: str,
    subject: x509.Name,
    signer_cert: x509.Certificate | None = None,
    cipher: str = "aes256",
) -> ClientRequest:
    """A CertPoll/GetCertInitial (20) for a PENDING request (RFC 8894 §3.3.2).

    The envelope carries an IssuerAndSubject (the CA's name and the requested subject); the
    transactionID must be the one of the original request, and the signer its key.
    """
    tbs = asn1_x509.Certificate.load(ca_certs[0].public_bytes(Encoding.DER))["tbs_certificate"]
    issuer_and_subject = asn1.seq(tbs["subject"].dump(), subject.public_bytes())
    return build_pkcs_req(
        key=key,
        ca_certs=ca_certs,
        challenge=None,
        subject=subject,
        signer_cert=signer_cert,
        transaction_id=transaction_id,
        message_type=MessageType.CERT_POLL,
        csr=issuer_and_subject,
        cipher=cipher,
    )


def _digest(name: str) -> Digest:
    try:
        return DIGESTS_BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown digest {name!r}; choose from {sorted(DIGESTS_BY_NAME)}"
        ) from None


def _issuer_and_serial(cert: x509.Certificate) -> bytes:
    # The issuer exactly as encoded in the certificate, as RFC 5652 §10.2.4 expects.
    tbs = asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))["tbs_certificate"]
    return cms.issuer_and_serial(tbs["issuer"].dump(), tbs["serial_number"].native)


# ---- responses ----------------------------------------------------------------------------


def verify_signed_message(der: bytes, trusted: Sequence[x509.Certificate]) -> SignedMessage:
    """Verify a SignedData signed by one of `trusted` (RSA PKCS#1 v1.5); else MessageError."""
    with _malformed("SignedData"):
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
    certificates = _pkcs7_certificates(degenerate, "CertRep certificate set")
    crls = _pkcs7_crls(degenerate, "CertRep CRL set")
    if not certificates and not crls:
        raise MessageError("SUCCESS CertRep carries no certificate")
    return certificates, crls


def _pkcs7_certificates(der: bytes, what: str) -> list[x509.Certificate]:
    with _malformed(what):
        info = asn1_cms.ContentInfo.load(der, strict=True)
        if info["content_type"].dotted != asn1.OID_SIGNED_DATA:
            raise MessageError(f"{what} is not a degenerate PKCS#7")
        certs = info["content"]["certificates"] or []
        return [
            x509.load_der_x509_certificate(c.chosen.dump())
            for c in certs
            if c.name == "certificate"
        ]


def _pkcs7_crls(der: bytes, what: str) -> list[x509.CertificateRevocationList]:
    with _malformed(what):
        info = asn1_cms.ContentInfo.load(der, strict=True)
        crls = info["content"]["crls"] or []
        return [x509.load_der_x509_crl(c.chosen.dump()) for c in crls if c.name == "crl"]


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


@contextmanager
def _malformed(what: str) -> Iterator[None]:
    """Turn asn1crypto's ValueError/TypeError/KeyError/RecursionError into a MessageError."""
    try:
        yield
    except MessageError:
        raise
    except Exception as exc:
        raise MessageError(f"malformed {what} ({type(exc).__name__})") from None
