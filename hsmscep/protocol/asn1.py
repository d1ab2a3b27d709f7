"""SCEP object identifiers, their registration with asn1crypto, and minimal DER encoders.

RFC 8894 §3.2.1.x defines six authenticated attributes; registering them once here lets
asn1crypto decode them by name everywhere else. The DER encoders build the responses on the
hot path without instantiating asn1crypto object trees. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

from asn1crypto import algos, cms, core, crl, csr, keys, x509  # noqa: F401  # set up below

OID_MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
OID_PKI_STATUS = "2.16.840.1.113733.1.9.3"
OID_FAIL_INFO = "2.16.840.1.113733.1.9.4"
OID_SENDER_NONCE = "2.16.840.1.113733.1.9.5"
OID_RECIPIENT_NONCE = "2.16.840.1.113733.1.9.6"
OID_TRANSACTION_ID = "2.16.840.1.113733.1.9.7"
OID_FAIL_INFO_TEXT = "1.3.6.1.5.5.7.24.1"  # RFC 8894 §3.2.1.4.1

OID_DATA = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
OID_CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
OID_MS_CERT_TEMPLATE_NAME = "1.3.6.1.4.1.311.20.2"

OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_RSAES_OAEP = "1.2.840.113549.1.1.7"
OID_MGF1 = "1.2.840.113549.1.1.8"

_SCEP_ATTRIBUTES: dict[str, tuple[str, type[core.Asn1Value]]] = {
    OID_MESSAGE_TYPE: ("message_type", core.PrintableString),
    OID_PKI_STATUS: ("pki_status", core.PrintableString),
    OID_FAIL_INFO: ("fail_info", core.PrintableString),
    OID_SENDER_NONCE: ("sender_nonce", core.OctetString),
    OID_RECIPIENT_NONCE: ("recipient_nonce", core.OctetString),
    OID_TRANSACTION_ID: ("transaction_id", core.PrintableString),
    OID_FAIL_INFO_TEXT: ("fail_info_text", core.UTF8String),
}


def _register() -> None:
    for oid, (name, spec) in _SCEP_ATTRIBUTES.items():
        set_spec = type(f"SetOf_{name}", (core.SetOf,), {"_child_spec": spec})
        cms.CMSAttributeType._map[oid] = name
        cms.CMSAttribute._oid_specs[name] = set_spec
    # asn1crypto builds the reverse map lazily; drop a stale one so new names resolve.
    cms.CMSAttributeType._reverse_map = None


_register()


def _subclasses(cls: type) -> Iterator[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def set_up_asn1crypto() -> int:
    """Set up every asn1crypto class now, in this thread; returns how many were left to do.

    asn1crypto builds a class's field maps (and reverse OID maps) on its first instance, and
    not thread-safely: two signing threads parsing their first certificate at once can read
    each other's half-built field list and misparse valid DER ("tag should have been 1, but 6
    was found"). Done once at import, nothing is left lazy for the threads.
    """
    done = 0
    for cls in dict.fromkeys(_subclasses(core.Asn1Value)):
        if cls not in core._SETUP_CLASSES:
            try:
                cls()
                done += 1
            except Exception:  # abstract bases (core.Choice) cannot be built; nothing uses them
                pass
    return done


set_up_asn1crypto()


# ---- DER encoding (definite lengths, X.690 §10) -----------------------------------------


def der_length(n: int) -> bytes:
    """Encode a DER length."""
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, content: bytes) -> bytes:
    """Encode one tag-length-value with a single-byte tag."""
    # The one- and two-byte lengths inline: a CertRep and a certificate take ~60 of these.
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    if n < 0x100:
        return bytes((tag, 0x81, n)) + content
    if n < 0x10000:
        return bytes((tag, 0x82, n >> 8, n & 0xFF)) + content
    return bytes((tag,)) + der_length(n) + content


def seq(*parts: bytes) -> bytes:
    return tlv(0x30, b"".join(parts))


def set_of(*parts: bytes, sort: bool = True) -> bytes:
    """Encode a SET OF; DER wants the encodings in ascending order."""
    return tlv(0x31, b"".join(sorted(parts) if sort else parts))


def octet_string(value: bytes) -> bytes:
    return tlv(0x04, value)


def printable_string(value: str) -> bytes:
    return tlv(0x13, value.encode("ascii"))


def integer(value: int) -> bytes:
    length = (~value if value < 0 else value).bit_length() // 8 + 1  # room for the sign bit
    return tlv(0x02, value.to_bytes(length, "big", signed=True))


@cache  # only ever called with the module's constant OIDs: the cache stays small
def oid(dotted: str) -> bytes:
    """Encode an OBJECT IDENTIFIER."""
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(0x06, bytes(body))


def oid_content(dotted: str) -> bytes:
    """The content octets of an OBJECT IDENTIFIER, as der.oid_bytes returns them."""
    encoded = oid(dotted)
    return encoded[1 + len(der_length(len(encoded) - 2)) :]


def explicit(tag_number: int, content: bytes) -> bytes:
    """[n] EXPLICIT (or IMPLICIT over a constructed type: same bytes, different header)."""
    return tlv(0xA0 | tag_number, content)


NULL = b"\x05\x00"


def algorithm_identifier(dotted: str, parameters: bytes | None = NULL) -> bytes:
    return seq(oid(dotted), parameters or b"")


def attribute(dotted: str, *values: bytes) -> bytes:
    return seq(oid(dotted), set_of(*values))
