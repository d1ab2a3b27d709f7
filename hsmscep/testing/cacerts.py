"""GetCACert replies on the client side: the CA/RA certificates and which one to encrypt to
(RFC 8894 §3.5.1, §4.2). No I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509

from hsmscep.errors import MessageError
from hsmscep.testing.pkcs7 import pkcs7_certificates


def parse_ca_certs(body: bytes) -> list[x509.Certificate]:
    """A GetCACert body: one DER certificate, or a degenerate PKCS#7 (order preserved)."""
    try:
        return [x509.load_der_x509_certificate(body)]
    except ValueError:
        pass
    certs = pkcs7_certificates(body, "GetCACert response")
    if not certs:
        raise MessageError("GetCACert response carries no certificate")
    return certs


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
