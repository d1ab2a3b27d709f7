"""An end-entity X.509 v3 certificate encoded from its parts (RFC 5280 §4.1). No I/O.

cryptography's CertificateBuilder converts and re-encodes every name and extension object on
each certificate (about a sixth of an enrollment's CPU outside the HSM). What is the same for
every certificate a CA issues under one template (issuer name, signature algorithm, the
constant extensions) is encoded once here, and a certificate is a few byte joins around the
per-request parts. The output is byte for byte what the builder makes from the same inputs
(tests/test_certificate_encoding.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from hsmscep.protocol import asn1

# The HSM-backed keys of protocol.keys are both; tests sign with software keys.
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_VERSION_3 = asn1.explicit(0, asn1.integer(2))
_TRUE = b"\x01\x01\xff"

# The signatureAlgorithm the builder writes: RSA PKCS#1 v1.5 with NULL parameters, ECDSA
# without parameters (RFC 4055 §5, RFC 5758 §3.2).
_RSA_SIGNATURE_OIDS = {
    "sha256": "1.2.840.113549.1.1.11",
    "sha384": "1.2.840.113549.1.1.12",
    "sha512": "1.2.840.113549.1.1.13",
}
_ECDSA_SIGNATURE_OIDS = {
    "sha256": "1.2.840.10045.4.3.2",
    "sha384": "1.2.840.10045.4.3.3",
    "sha512": "1.2.840.10045.4.3.4",
}


def extension(value: x509.ExtensionType, critical: bool) -> bytes:
    """One Extension: extnID, critical (only when TRUE, as DER wants), extnValue."""
    flag = _TRUE if critical else b""
    return asn1.seq(
        asn1.oid(value.oid.dotted_string), flag, asn1.octet_string(value.public_bytes())
    )


# By identity, holding the object so that its id cannot be reused: hashing an extension
# value (AuthorityKeyIdentifier, CRLDistributionPoints) costs more than encoding it.
_ENCODED: dict[tuple[int, bool], tuple[x509.ExtensionType, bytes]] = {}
_ENCODED_MAX = 256


def constant_extension(value: x509.ExtensionType, critical: bool) -> bytes:
    """extension() for the values a template, policy or issuer holds, encoded once each."""
    key = (id(value), critical)
    hit = _ENCODED.get(key)
    if hit is not None and hit[0] is value:
        return hit[1]
    if len(_ENCODED) >= _ENCODED_MAX:  # per-request values (a renewal's EKU) come and go
        _ENCODED.clear()
    encoded = extension(value, critical)
    _ENCODED[key] = (value, encoded)
    return encoded


def signature_algorithm(key: PrivateKey, hash_name: str) -> bytes:
    """The AlgorithmIdentifier of a signature by `key` over a `hash_name` digest."""
    if isinstance(key, rsa.RSAPrivateKey):
        return asn1.algorithm_identifier(_RSA_SIGNATURE_OIDS[hash_name])
    return asn1.algorithm_identifier(_ECDSA_SIGNATURE_OIDS[hash_name], None)


def encoded_instant(moment: datetime) -> datetime:
    """The instant validity_time writes for `moment`: UTC (a naive time is taken as UTC, as
    the builder does), whole seconds."""
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return utc.replace(microsecond=0)


def validity_time(moment: datetime) -> bytes:
    """UTCTime for 1950-2049, GeneralizedTime otherwise (RFC 5280 §4.1.2.5), whole seconds;
    a naive time is taken as UTC, as the builder does."""
    utc = encoded_instant(moment)
    # bytes % formatting: a third of strftime's cost (two per certificate, bench/PROFILE.md).
    parts = (utc.month, utc.day, utc.hour, utc.minute, utc.second)
    if 1950 <= utc.year < 2050:
        return asn1.tlv(0x17, b"%02d%02d%02d%02d%02d%02dZ" % (utc.year % 100, *parts))
    return asn1.tlv(0x18, b"%04d%02d%02d%02d%02d%02dZ" % (utc.year, *parts))


def encode_certificate(
    *,
    serial: int,
    issuer_der: bytes,
    not_before: datetime,
    not_after: datetime,
    subject_der: bytes,
    spki_der: bytes,
    extensions: Sequence[bytes],
    key: PrivateKey,
    hash_algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512,
) -> bytes:
    """The signed certificate's DER; `issuer_der`, `subject_der` and `spki_der` are encoded
    Name and SubjectPublicKeyInfo, `extensions` encoded Extension values in order."""
    _check(serial, not_before, not_after)
    algorithm = signature_algorithm(key, hash_algorithm.name)
    tbs = asn1.seq(
        _VERSION_3,
        asn1.integer(serial),
        algorithm,
        issuer_der,
        asn1.seq(validity_time(not_before), validity_time(not_after)),
        subject_der,
        spki_der,
        asn1.explicit(3, asn1.seq(*extensions)),
    )
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(tbs, padding.PKCS1v15(), hash_algorithm)
    else:
        signature = key.sign(tbs, ec.ECDSA(hash_algorithm))
    return asn1.seq(tbs, algorithm, asn1.tlv(0x03, b"\x00" + signature))


_EARLIEST = datetime(1950, 1, 1, tzinfo=UTC)


def _check(serial: int, not_before: datetime, not_after: datetime) -> None:
    # The builder's refusals, kept: an expired CA makes notAfter (bounded by the CA's) fall
    # before notBefore, and that must fail the request, not issue an inverted validity.
    if not 0 < serial < 1 << 159:
        raise ValueError("the serial number must be positive and at most 159 bits")
    before, after = (
        t.replace(tzinfo=UTC) if t.tzinfo is None else t for t in (not_before, not_after)
    )
    if before < _EARLIEST or after < _EARLIEST:
        raise ValueError("validity dates must be on or after 1950 January 1")
    if after < before:
        raise ValueError("the not valid after date must be after the not valid before date")
