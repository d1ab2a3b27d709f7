"""Reading degenerate PKCS#7 (certs-only SignedData, RFC 8894 §3.4) with asn1crypto.

The client's reader is asn1crypto on purpose: the server parses with its own DER reader, so a
round trip checks one implementation against the other. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from asn1crypto import cms as asn1_cms
from cryptography import x509

from hsmscep.errors import MessageError
from hsmscep.protocol import asn1


def pkcs7_certificates(der: bytes, what: str) -> list[x509.Certificate]:
    """The certificates of a degenerate PKCS#7, in order; MessageError names `what`."""
    with malformed(what):
        info = asn1_cms.ContentInfo.load(der, strict=True)
        if info["content_type"].dotted != asn1.OID_SIGNED_DATA:
            raise MessageError(f"{what} is not a degenerate PKCS#7")
        certs = info["content"]["certificates"] or []
        return [
            x509.load_der_x509_certificate(c.chosen.dump())
            for c in certs
            if c.name == "certificate"
        ]


def pkcs7_crls(der: bytes, what: str) -> list[x509.CertificateRevocationList]:
    """The CRLs of a degenerate PKCS#7 (a GetCRL reply's content)."""
    with malformed(what):
        info = asn1_cms.ContentInfo.load(der, strict=True)
        crls = info["content"]["crls"] or []
        return [x509.load_der_x509_crl(c.chosen.dump()) for c in crls if c.name == "crl"]


@contextmanager
def malformed(what: str) -> Iterator[None]:
    """Turn asn1crypto's ValueError/TypeError/KeyError/RecursionError into a MessageError."""
    try:
        yield
    except MessageError:
        raise
    except Exception as exc:
        raise MessageError(f"malformed {what} ({type(exc).__name__})") from None
