"""SCEP pkiMessage decoding and client-signature verification (RFC 8894 §3.2). No I/O.

`decode_pki_message` is the line between HTTP errors and signed CertReps: whatever it raises
(MessageError) is answered with HTTP 400, and once it returns, the transactionID and nonce
are authenticated and every outcome is a signed CertRep.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from asn1crypto import algos
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmscep.errors import MessageError
from hsmscep.protocol import asn1, der
from hsmscep.protocol.algorithms import (
    ECDSA_SIGNATURE_DIGESTS,
    RSA_SIGNATURE_DIGESTS,
    Digest,
    digest_by_oid,
)

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
    signer_subject_der: bytes  # as encoded: the same bytes as the issuer's are the same name
    signer_serial: int
    content: bytes  # the encapsulated pkcsPKIEnvelope (ContentInfo DER), may be empty
    # signer_cert's key, the object that verified the signature: cryptography builds a new
    # OpenSSL key on every public_key() call, and a key object reused for the CSR's signature
    # and the reply's key transport keeps its set-up (bench/PROFILE.md).
    signer_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    signer_cert_der: bytes  # signer_cert as it came: public_bytes() would copy it out again

    @property
    def signer_fingerprint(self) -> str:
        return hashlib.sha256(self.signer_cert_der).hexdigest()


def decode_pki_message(data: bytes) -> PkiRequest:
    """Parse a pkiMessage and verify the client's signature; raise MessageError if it fails."""
    with der.malformed("pkiMessage"):
        return _decode(data)


_OID_SIGNED_DATA = asn1.oid_content(asn1.OID_SIGNED_DATA)
_OID_DATA = asn1.oid_content(asn1.OID_DATA)
_STRING_ATTRS = {
    asn1.oid_content(asn1.OID_MESSAGE_TYPE): "messageType",
    asn1.oid_content(asn1.OID_TRANSACTION_ID): "transactionID",
}
_OCTET_ATTRS = {
    asn1.oid_content(asn1.OID_MESSAGE_DIGEST): "messageDigest",
    asn1.oid_content(asn1.OID_SENDER_NONCE): "senderNonce",
}
_CONTENT_TYPE = asn1.oid_content(asn1.OID_CONTENT_TYPE)


def _decode(data: bytes) -> PkiRequest:
    signed_data = der.content_info(data, _OID_SIGNED_DATA, "pkiMessage")
    fields = der.children(data, der.expect(data, signed_data, der.SEQUENCE, "SignedData"))
    if len(fields) < 4:
        raise MessageError("SignedData is incomplete")
    encap, rest = fields[2], fields[3:]
    certs = [
        [c for c in der.children(data, f) if c.tag == der.SEQUENCE] for f in rest if f.tag == 0xA0
    ]
    signer_infos = der.children(data, der.expect(data, rest[-1], der.SET, "signerInfos"))
    if len(signer_infos) != 1:
        raise MessageError(f"expected one signerInfo, found {len(signer_infos)}")
    content = _encapsulated_content(data, encap)

    si = der.children(data, der.expect(data, signer_infos[0], der.SEQUENCE, "SignerInfo"))
    if len(si) < 6 or si[3].tag != 0xA0:
        raise MessageError("signerInfo has no signed attributes")
    sid, digest_alg, signed_attrs, signature_alg, signature = si[1], si[2], si[3], si[4], si[5]
    digest = digest_by_oid(
        der.dotted(der.oid_bytes(data, der.children(data, digest_alg)[0], "digestAlgorithm"))
    )
    attrs = _signed_attributes(data, signed_attrs)
    message_digest = _required(attrs, "messageDigest")
    computed = digest.compute(content)
    if not hmac.compare_digest(computed, message_digest):
        raise MessageError("messageDigest does not match the content")
    if attrs.get("contentType", _OID_DATA) != _OID_DATA:
        raise MessageError("signed contentType is not id-data")

    found = _signer_certificate(data, certs[0] if certs else [], sid)
    cert_der, issuer_der, serial, subject_der = found
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise MessageError("signer certificate does not parse") from None
    signature_value = der.value(data, der.expect(data, signature, der.OCTET_STRING, "signature"))
    signer_key = _verify_signature(cert, data, signed_attrs, signature_alg, signature_value, digest)

    message_type = _text(_required(attrs, "messageType"), "messageType")
    transaction_id = _text(_required(attrs, "transactionID"), "transactionID")
    if not 0 < len(transaction_id) <= MAX_TRANSACTION_ID:
        raise MessageError("transactionID length out of range")
    sender_nonce = attrs.get("senderNonce")
    if sender_nonce is not None and len(sender_nonce) > MAX_NONCE:
        raise MessageError("senderNonce too long")
    return PkiRequest(
        message_type=message_type,
        transaction_id=transaction_id,
        sender_nonce=sender_nonce,
        digest=digest,
        signer_cert=cert,
        signer_issuer_der=issuer_der,
        signer_subject_der=subject_der,
        signer_serial=serial,
        content=content,
        signer_key=signer_key,
        signer_cert_der=cert_der,
    )


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError(f"{what} is not valid UTF-8") from None


def _signed_attributes(data: bytes, signed_attrs: der.Tlv) -> dict[str, bytes]:
    """The SCEP attributes we read, by name; duplicated or multi-valued ones are refused."""
    out: dict[str, bytes] = {}
    seen: set[bytes] = set()
    for attr in der.children(data, signed_attrs):
        parts = der.children(data, der.expect(data, attr, der.SEQUENCE, "attribute"))
        if len(parts) != 2:
            raise MessageError("malformed attribute")
        oid = der.oid_bytes(data, parts[0], "attribute type")
        if oid in seen:
            raise MessageError(f"attribute {der.dotted(oid)} appears twice")
        seen.add(oid)
        values = der.children(data, der.expect(data, parts[1], der.SET, "attribute values"))
        if len(values) != 1:
            raise MessageError(f"attribute {der.dotted(oid)} must have exactly one value")
        if oid in _STRING_ATTRS:
            name = _STRING_ATTRS[oid]
            der.text(data, values[0], name)  # type check only
            out[name] = der.value(data, values[0])
        elif oid in _OCTET_ATTRS:
            name = _OCTET_ATTRS[oid]
            out[name] = der.value(data, der.expect(data, values[0], der.OCTET_STRING, name))
        elif oid == _CONTENT_TYPE:
            out["contentType"] = der.oid_bytes(data, values[0], "contentType")
    return out


def _required(attrs: dict[str, bytes], name: str) -> bytes:
    try:
        return attrs[name]
    except KeyError:
        raise MessageError(f"{name} attribute missing") from None


def _encapsulated_content(data: bytes, encap: der.Tlv) -> bytes:
    parts = der.children(data, der.expect(data, encap, der.SEQUENCE, "encapContentInfo"))
    if not parts or der.oid_bytes(data, parts[0], "eContentType") != _OID_DATA:
        raise MessageError("encapsulated content is not id-data")
    if len(parts) == 1:
        return b""
    inner = der.children(data, der.expect(data, parts[1], 0xA0, "eContent"))
    if len(inner) != 1 or inner[0].tag & ~0x20 != der.OCTET_STRING:
        raise MessageError("encapsulated content is not an OCTET STRING")
    # Apple sends a constructed (BER) OCTET STRING; the digest covers the concatenated octets.
    return der.value(data, inner[0])


def _signer_certificate(
    data: bytes, certs: list[der.Tlv], sid: der.Tlv
) -> tuple[bytes, bytes, int, bytes]:
    """(certificate DER, its issuer DER, its serial, its subject DER) for the SignerInfo's sid."""
    if not certs:
        raise MessageError("no signer certificate in the message")
    if sid.tag == der.SEQUENCE:  # IssuerAndSerialNumber
        want_issuer, want_serial = der.children(data, sid)[:2]
        issuer_raw = der.raw(data, want_issuer)
        serial_raw = der.value(data, want_serial)
        for cert in certs:
            issuer, serial, subject = _names_and_serial(data, cert)
            if der.value(data, serial) == serial_raw and der.raw(data, issuer) == issuer_raw:
                return _found(data, cert, issuer, int.from_bytes(serial_raw, "big"), subject)
        # Clients re-encode names (interop-quirks #12): fall back to the RFC 5280 comparison.
        want = asn1_x509.Name.load(issuer_raw)
        for cert in certs:
            issuer, serial, subject = _names_and_serial(data, cert)
            if (
                der.value(data, serial) == serial_raw
                and asn1_x509.Name.load(der.raw(data, issuer)) == want
            ):
                return _found(data, cert, issuer, int.from_bytes(serial_raw, "big"), subject)
    elif sid.tag == 0x80:  # [0] SubjectKeyIdentifier
        ski = der.value(data, sid)
        for cert in certs:
            parsed = asn1_x509.Certificate.load(der.raw(data, cert))
            if parsed.key_identifier == ski:
                issuer, _, subject = _names_and_serial(data, cert)
                return _found(data, cert, issuer, parsed.serial_number, subject)
    raise MessageError("signer certificate not found in the message")


def _found(
    data: bytes, cert: der.Tlv, issuer: der.Tlv, serial: int, subject: der.Tlv
) -> tuple[bytes, bytes, int, bytes]:
    return der.raw(data, cert), der.raw(data, issuer), serial, der.raw(data, subject)


def _names_and_serial(data: bytes, cert: der.Tlv) -> tuple[der.Tlv, der.Tlv, der.Tlv]:
    """A certificate's (issuer, serialNumber, subject); a TBS too short for a subject is left
    to the certificate parser to refuse (an empty element stands in)."""
    tbs = der.children(data, der.children(data, cert)[0])
    offset = 1 if tbs[0].tag == 0xA0 else 0  # [0] version is optional
    subject = tbs[offset + 4] if len(tbs) > offset + 4 else der.Tlv(0, 0, 0, 0, 0)
    return tbs[offset + 2], tbs[offset], subject


def _verify_signature(
    cert: x509.Certificate,
    data: bytes,
    signed_attrs: der.Tlv,
    signature_alg: der.Tlv,
    signature: bytes,
    digest: Digest,
) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """Verify the signature over the signed attributes; the signer's key object back."""
    alg_parts = der.children(data, der.expect(data, signature_alg, der.SEQUENCE, "signature alg"))
    sig_oid = der.dotted(der.oid_bytes(data, alg_parts[0], "signatureAlgorithm"))
    # The signature covers the SET OF encoding of the attributes as the client sent them
    # (RFC 5652 §5.4); DER re-encoding is only a fallback for clients that signed sorted
    # attributes but transmitted them unsorted.
    body = data[signed_attrs.body : signed_attrs.body_end]
    received = b"\x31" + asn1.der_length(len(body)) + body
    public_key = cert.public_key()
    hashed = digest.hash()
    if isinstance(public_key, rsa.RSAPublicKey):
        if sig_oid == "1.2.840.113549.1.1.10":
            pss = algos.RSASSAPSSParams.load(der.raw(data, alg_parts[1]))
            pss_hash = digest_by_oid(pss["hash_algorithm"]["algorithm"].dotted)
            if pss_hash.name != digest.name:
                raise MessageError("RSASSA-PSS hash differs from the digest algorithm")
            pad: padding.AsymmetricPadding = padding.PSS(
                padding.MGF1(pss_hash.hash()), pss["salt_length"].native
            )
        elif (
            sig_oid == asn1.OID_RSA_ENCRYPTION or RSA_SIGNATURE_DIGESTS.get(sig_oid) == digest.name
        ):
            pad = padding.PKCS1v15()
        else:
            raise MessageError(f"unsupported signature algorithm {sig_oid}")

        def verify(signed: bytes) -> None:
            pre = digest.compute(signed)
            public_key.verify(signature, pre, pad, Prehashed(hashed))

    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if ECDSA_SIGNATURE_DIGESTS.get(sig_oid, digest.name) != digest.name:
            raise MessageError(f"unsupported signature algorithm {sig_oid}")

        def verify(signed: bytes) -> None:
            pre = digest.compute(signed)
            public_key.verify(signature, pre, ec.ECDSA(Prehashed(hashed)))

    else:
        raise MessageError("unsupported signer key type")
    try:
        verify(received)
        return public_key
    except InvalidSignature:
        pass
    attrs = [der.raw(data, a) for a in der.children(data, signed_attrs)]
    canonical = asn1.set_of(*attrs)
    if canonical != received:
        try:
            verify(canonical)
            return public_key
        except InvalidSignature:
            pass
    raise MessageError("signature does not verify")
