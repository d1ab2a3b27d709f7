"""The client's requests: PKCSReq/RenewalReq, GetCert, GetCRL and CertPoll pkiMessages
(RFC 8894 §3.2-3.3), with the CSR and throwaway signer certificate they carry.

Reuses the server's DER builders (asn1.py, cms.py). No I/O; the only side inputs are fresh
randomness and the clock (for the self-signed signer certificate).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from asn1crypto import x509 as asn1_x509
from cryptography import x509
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
)
from hsmscep.protocol.codes import MessageType
from hsmscep.testing.cacerts import select_recipient

_RSA_SIGNATURE_OIDS = {name: dotted for dotted, name in RSA_SIGNATURE_DIGESTS.items()}


@dataclass(frozen=True, slots=True)
class ClientRequest:
    der: bytes  # the pkiMessage DER
    transaction_id: str
    sender_nonce: bytes
    key: rsa.RSAPrivateKey  # client key (also the CSR key unless a CSR was given)
    signer_cert: x509.Certificate


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
