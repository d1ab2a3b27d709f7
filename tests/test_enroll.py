"""PKIOperation end to end: hsmscep.testing.client against a live server, SoftHSM2 and SQLite.

Every request goes over HTTP to a real `hsmscep serve` process; every answer is checked with
the client's own CertRep reader, and every outcome against the rows in the store.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import httpx
import pytest
from asn1crypto import cms as asn1_cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID

from hsmscep.protocol import asn1, cms
from hsmscep.protocol.algorithms import CIPHERS_BY_NAME, DIGESTS_BY_NAME
from hsmscep.testing.cacerts import parse_ca_certs
from hsmscep.testing.replies import CertRepResult, open_cert_rep
from hsmscep.testing.requests import (
    ClientRequest,
    build_csr,
    build_pkcs_req,
    build_signed_attributes,
    self_signed_signer,
    sign_pki_message,
)
from tests.conftest import DevCa, Server

PKI_MESSAGE = "application/x-pki-message"
SUCCESS, FAILURE = "0", "2"
BAD_ALG, BAD_MESSAGE_CHECK, BAD_REQUEST = "0", "1", "2"
UPN = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
INTUNE_SID_URI = "tag:microsoft.com,2022-09-14:sid:S-1-5-21-1-2-3-1001"
OID_RSAES_OAEP = "1.2.840.113549.1.1.7"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
TIMEOUT = 30.0
AES256_CBC = CIPHERS_BY_NAME["aes256"].oid
AES128_CBC = CIPHERS_BY_NAME["aes128"].oid


# ---- helpers shared with test_http.py -----------------------------------------------------


@cache
def rsa_key(index: int, bits: int = 2048) -> rsa.RSAPrivateKey:
    """A client key, generated once per (index, bits) for the session."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def subject(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsmscep tests"),
        ]
    )


def fetch_ca_certs(url: str) -> list[x509.Certificate]:
    """GetCACert over HTTP, parsed as a client would."""
    response = httpx.get(f"{url}/scep", params={"operation": "GetCACert"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return parse_ca_certs(response.content)


def post_pki(url: str, body: bytes, client: httpx.Client | None = None) -> httpx.Response:
    """POST a pkiMessage to the PKIOperation endpoint."""
    target = f"{url}/scep?operation=PKIOperation"
    headers = {"Content-Type": PKI_MESSAGE}
    if client is not None:
        return client.post(target, content=body, headers=headers)
    return httpx.post(target, content=body, headers=headers, timeout=TIMEOUT)


def new_request(
    ca_certs: Sequence[x509.Certificate],
    challenge: str | None,
    *,
    cn: str = "device",
    key_index: int = 0,
    **kwargs: Any,
) -> ClientRequest:
    """A PKCSReq with a cached RSA key and a fresh transactionID."""
    return build_pkcs_req(
        key=rsa_key(key_index),
        ca_certs=ca_certs,
        challenge=challenge,
        subject=subject(cn),
        **kwargs,
    )


def open_reply(
    response: httpx.Response, request: ClientRequest, ca_certs: Sequence[x509.Certificate]
) -> CertRepResult:
    """Check the HTTP framing of a CertRep, then verify it fully with the client's reader."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == PKI_MESSAGE
    return open_cert_rep(response.content, request, ca_certs)


def issued_cert(
    response: httpx.Response, request: ClientRequest, ca_certs: Sequence[x509.Certificate]
) -> x509.Certificate:
    """The one certificate of a SUCCESS CertRep, checked against the CA and the request."""
    result = open_reply(response, request, ca_certs)
    assert (result.pki_status, result.fail_info) == (SUCCESS, None)
    assert len(result.certificates) == 1  # only the issued certificate (interop-quirks #7)
    cert = result.certificates[0]
    cert.verify_directly_issued_by(ca_certs[0])
    return cert


def spki(key: Any) -> bytes:
    return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def row_count(ca: DevCa) -> int:
    with closing(sqlite3.connect(ca.settings.store.path)) as db:
        return int(db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0])


def rows_for(ca: DevCa, transaction_id: str) -> list[tuple[Any, ...]]:
    """(serial, subject, transaction_id, der, sans_json) rows stored for a transactionID."""
    with closing(sqlite3.connect(ca.settings.store.path)) as db:
        query = (
            "SELECT serial, subject, transaction_id, der, sans_json FROM certificates"
            " WHERE transaction_id = ?"
        )
        return list(db.execute(query, (transaction_id,)).fetchall())


# ---- hand-made requests and reply inspection ----------------------------------------------


def issuer_and_serial(cert: x509.Certificate) -> bytes:
    tbs = asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))["tbs_certificate"]
    return cms.issuer_and_serial(tbs["issuer"].dump(), tbs["serial_number"].native)


def signed_request(
    envelope: bytes,
    key: rsa.RSAPrivateKey,
    *,
    cn: str = "hand-built",
    digest: str = "sha256",
    message_type: str = "19",
) -> ClientRequest:
    """Sign an arbitrary pkcsPKIEnvelope as a PKCSReq with a fresh self-signed signer."""
    signer = self_signed_signer(key, subject(cn))
    transaction_id = secrets.token_hex(16)
    nonce = secrets.token_bytes(16)
    attrs = build_signed_attributes(
        content=envelope,
        digest=digest,
        message_type=message_type,
        transaction_id=transaction_id,
        sender_nonce=nonce,
    )
    der = sign_pki_message(
        content=envelope, signed_attrs=attrs, key=key, signer_cert=signer, digest=digest
    )
    return ClientRequest(der, transaction_id, nonce, key, signer)


def hand_csr(key: rsa.RSAPrivateKey, name: x509.Name, attributes: Sequence[bytes]) -> bytes:
    """A PKCS#10 request with exactly the given Attribute DERs, correctly signed."""
    info = asn1.seq(
        asn1.integer(0),
        name.public_bytes(),
        spki(key.public_key()),
        asn1.explicit(0, b"".join(sorted(attributes))),
    )
    signature = key.sign(info, padding.PKCS1v15(), hashes.SHA256())
    algorithm = asn1.algorithm_identifier("1.2.840.113549.1.1.11")
    return asn1.seq(info, algorithm, asn1.tlv(0x03, b"\x00" + signature))


def challenge_attr(*values: bytes) -> bytes:
    return asn1.attribute(asn1.OID_CHALLENGE_PASSWORD, *values)


def extension_request(*extensions: tuple[str, bool, bytes]) -> bytes:
    """An extensionRequest attribute of (OID, critical, extnValue DER) triples."""
    encoded = [
        asn1.seq(asn1.oid(oid), asn1.tlv(0x01, b"\xff") if critical else b"", asn1.octet_string(v))
        for oid, critical, v in extensions
    ]
    return asn1.attribute(asn1.OID_EXTENSION_REQUEST, asn1.seq(*encoded))


def aes_cbc(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    """AES-CBC with PKCS#7 padding, as RFC 8894 clients encrypt the CSR."""
    padder = sym_padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    padded = padder.update(plaintext) + padder.finalize()
    return encryptor.update(padded) + encryptor.finalize()


def hand_envelope(
    ra: x509.Certificate,
    plaintext: bytes,
    *,
    cipher_oid: str = AES256_CBC,
    key: bytes | None = None,
    iv: bytes | None = None,
    ciphertext: bytes | None = None,
    iv_parameter: bytes | None = None,
    recipient_info: bytes | None = None,
) -> bytes:
    """A pkcsPKIEnvelope to the RA, AES-CBC encrypted, with any field overridable."""
    key = os.urandom(32) if key is None else key
    iv = os.urandom(16) if iv is None else iv
    if ciphertext is None:
        ciphertext = aes_cbc(key, iv, plaintext)
    if recipient_info is None:
        ra_public = ra.public_key()
        assert isinstance(ra_public, rsa.RSAPublicKey)
        recipient_info = asn1.seq(
            asn1.integer(0),
            issuer_and_serial(ra),
            asn1.algorithm_identifier(OID_RSA_ENCRYPTION),
            asn1.octet_string(ra_public.encrypt(key, padding.PKCS1v15())),
        )
    parameter = asn1.octet_string(iv) if iv_parameter is None else iv_parameter
    eci = asn1.seq(
        asn1.oid(asn1.OID_DATA),
        asn1.algorithm_identifier(cipher_oid, parameter),
        asn1.tlv(0x80, ciphertext),
    )
    enveloped = asn1.seq(asn1.integer(0), asn1.set_of(recipient_info), eci)
    return asn1.seq(asn1.oid(asn1.OID_ENVELOPED_DATA), asn1.explicit(0, enveloped))


def reply_algorithms(der: bytes) -> tuple[str, str, str]:
    """(SignerInfo digest OID, reply envelope cipher OID, key transport OID) of a CertRep."""
    signed = asn1_cms.ContentInfo.load(der)["content"]
    signer_info = signed["signer_infos"][0]
    digest = signer_info["digest_algorithm"]["algorithm"].dotted
    assert [a["algorithm"].dotted for a in signed["digest_algorithms"]] == [digest]
    envelope = asn1_cms.ContentInfo.load(signed["encap_content_info"]["content"].native)
    enveloped = envelope["content"]
    eci = enveloped["encrypted_content_info"]
    cipher = eci["content_encryption_algorithm"]["algorithm"].dotted
    [recipient] = list(enveloped["recipient_infos"])
    transport = recipient.chosen["key_encryption_algorithm"]["algorithm"].dotted
    return digest, cipher, transport


# ---- fixtures and expectations ------------------------------------------------------------


@pytest.fixture(scope="module")
def ca_certs(server: Server) -> list[x509.Certificate]:
    return fetch_ca_certs(server.url)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


def expect_failure(
    dev_ca: DevCa,
    server: Server,
    ca_certs: Sequence[x509.Certificate],
    request: ClientRequest,
    fail_info: str,
) -> None:
    """POST `request`: a verified FAILURE CertRep with `fail_info`, and nothing stored."""
    before = row_count(dev_ca)
    result = open_reply(post_pki(server.url, request.der), request, ca_certs)
    assert (result.pki_status, result.fail_info) == (FAILURE, fail_info)
    assert result.certificates == []
    assert result.signer_cert == ca_certs[1]  # signed by the RA, not the CA
    assert row_count(dev_ca) == before
    assert rows_for(dev_ca, request.transaction_id) == []


def expect_http_400(dev_ca: DevCa, server: Server, body: bytes) -> None:
    """POST `body`: a short plain-text 400 before any signature check, and nothing stored."""
    before = row_count(dev_ca)
    response = post_pki(server.url, body)
    assert response.status_code == 400, response.content[:200]
    assert response.headers["content-type"].startswith("text/plain")
    assert len(response.content) < 300
    assert b"Traceback" not in response.content
    assert row_count(dev_ca) == before


# ---- success ------------------------------------------------------------------------------


def test_enroll_over_post_issues_a_complete_certificate(
    dev_ca: DevCa, server: Server, ca_certs: list[x509.Certificate]
) -> None:
    """A PKCSReq over POST: the certificate, its extensions and its row are all right."""
    key = rsa_key(1)
    upn = x509.OtherName(UPN, asn1.tlv(0x0C, b"alice@corp.example"))
    sans: list[x509.GeneralName] = [
        x509.DNSName("device.example.com"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.10")),
        x509.IPAddress(ipaddress.ip_address("2001:db8::10")),
        x509.RFC822Name("alice@example.com"),
        x509.UniformResourceIdentifier("https://example.com/devices/42"),
        x509.UniformResourceIdentifier(INTUNE_SID_URI),
        upn,
    ]
    name = subject("full-device")
    request = build_pkcs_req(
        key=key, ca_certs=ca_certs, challenge=dev_ca.challenge, subject=name, sans=sans
    )
    before = row_count(dev_ca)
    sent_at = datetime.now(UTC)
    response = post_pki(server.url, request.der)
    cert = issued_cert(response, request, ca_certs)
    ca_cert = ca_certs[0]

    # Signed by the CA key (checked by hand as well as by verify_directly_issued_by).
    ca_public = ca_cert.public_key()
    assert isinstance(ca_public, rsa.RSAPublicKey)
    assert cert.signature_hash_algorithm is not None
    ca_public.verify(
        cert.signature,
        cert.tbs_certificate_bytes,
        padding.PKCS1v15(),
        cert.signature_hash_algorithm,
    )
    assert cert.issuer == ca_cert.subject
    assert spki(cert.public_key()) == spki(key.public_key())
    assert cert.subject == name
    assert cert.serial_number > 0 and cert.serial_number.bit_length() > 63

    ext = cert.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value == x509.SubjectAlternativeName(sans)
    assert not san.critical  # the subject is not empty
    assert INTUNE_SID_URI in san.value.get_values_for_type(x509.UniformResourceIdentifier)
    assert san.value.get_values_for_type(x509.OtherName) == [upn]
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature and ku.value.key_encipherment
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.content_commitment)
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest

    # Backdated by about five minutes, valid for about a year.
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    backdate = sent_at - not_before
    assert timedelta(minutes=4) <= backdate <= timedelta(minutes=7)
    assert timedelta(days=364) <= not_after - sent_at <= timedelta(days=366)

    # Exactly one new row, holding this very certificate.
    assert row_count(dev_ca) == before + 1
    [(serial, stored_subject, tid, der, sans_json)] = rows_for(dev_ca, request.transaction_id)
    assert int(serial, 16) == cert.serial_number
    assert stored_subject == cert.subject.rfc4514_string()
    assert tid == request.transaction_id
    assert der == cert.public_bytes(Encoding.DER)
    stored_sans = json.loads(sans_json)
    assert f"URI:{INTUNE_SID_URI}" in stored_sans
    assert "UPN:alice@corp.example" in stored_sans
    assert "DNS:device.example.com" in stored_sans


MATRIX = [
    (c, d) for c in ("des3", "aes128", "aes192", "aes256") for d in ("sha1", "sha256", "sha512")
]


@pytest.mark.parametrize(("cipher", "digest"), MATRIX)
def test_reply_mirrors_cipher_and_digest(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate], cipher: str, digest: str
) -> None:
    """The CertRep is encrypted with the request's cipher and signed with its digest."""
    request = new_request(
        ca_certs, dev_ca.challenge, cn=f"{cipher}-{digest}", cipher=cipher, digest=digest
    )
    response = post_pki(server.url, request.der)
    cert = issued_cert(response, request, ca_certs)
    assert spki(cert.public_key()) == spki(request.key.public_key())
    reply_digest, reply_cipher, transport = reply_algorithms(response.content)
    assert reply_digest == DIGESTS_BY_NAME[digest].oid
    assert reply_cipher == CIPHERS_BY_NAME[cipher].oid
    assert transport == OID_RSA_ENCRYPTION


@pytest.mark.parametrize("cipher", ["des3", "aes128", "aes192", "aes256"])
def test_oaep_key_transport_is_mirrored(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate], cipher: str
) -> None:
    """An RSAES-OAEP request (Windows CNG) gets an OAEP-wrapped reply with the same cipher."""
    request = new_request(ca_certs, dev_ca.challenge, cn=f"oaep-{cipher}", cipher=cipher, oaep=True)
    response = post_pki(server.url, request.der)
    issued_cert(response, request, ca_certs)
    reply_digest, reply_cipher, transport = reply_algorithms(response.content)
    assert reply_digest == DIGESTS_BY_NAME["sha256"].oid
    assert reply_cipher == CIPHERS_BY_NAME[cipher].oid
    assert transport == OID_RSAES_OAEP


def test_single_des_request_is_answered_with_des3(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """Single DES is read (old clients) but never written back (interop-quirks #5)."""
    request = new_request(ca_certs, dev_ca.challenge, cn="des-client", cipher="des")
    response = post_pki(server.url, request.der)
    issued_cert(response, request, ca_certs)
    assert reply_algorithms(response.content)[1] == CIPHERS_BY_NAME["des3"].oid


def test_ec_p256_csr_gets_digital_signature_only(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """An EC CSR key (the signer stays RSA for the reply envelope) gets KU digitalSignature."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    name = subject("ec-device")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, dev_ca.challenge.encode())
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("ec.example.com")]), critical=False
        )
        .sign(ec_key, hashes.SHA256())
    )
    request = build_pkcs_req(
        key=rsa_key(2),
        ca_certs=ca_certs,
        challenge=None,
        subject=name,
        csr=csr.public_bytes(Encoding.DER),
    )
    cert = issued_cert(post_pki(server.url, request.der), request, ca_certs)
    assert spki(cert.public_key()) == spki(ec_key.public_key())
    assert cert.subject == name
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert not ku.key_encipherment and not ku.key_agreement and not ku.data_encipherment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    [row] = rows_for(dev_ca, request.transaction_id)
    assert row[3] == cert.public_bytes(Encoding.DER)


def test_utf8_challenge_is_accepted(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """challengePassword as UTF8String works as well as PrintableString."""
    key = rsa_key(0)
    name = subject("utf8-challenge")
    csr = build_csr(key, name, challenge=dev_ca.challenge, challenge_as_utf8=True)
    assert asn1.tlv(0x0C, dev_ca.challenge.encode()) in csr
    request = build_pkcs_req(key=key, ca_certs=ca_certs, challenge=None, subject=name, csr=csr)
    cert = issued_cert(post_pki(server.url, request.der), request, ca_certs)
    assert cert.subject == name
    assert len(rows_for(dev_ca, request.transaction_id)) == 1


def test_empty_subject_with_san_gets_a_critical_san(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """RFC 5280 §4.2.1.6: with an empty subject the SAN carries the identity, critical."""
    sans = x509.SubjectAlternativeName([x509.DNSName("only-san.example.com")])
    csr = hand_csr(
        rsa_key(0),
        x509.Name([]),
        [
            challenge_attr(asn1.printable_string(dev_ca.challenge)),
            extension_request(("2.5.29.17", False, sans.public_bytes())),
        ],
    )
    request = build_pkcs_req(
        key=rsa_key(0), ca_certs=ca_certs, challenge=None, subject=subject("x"), csr=csr
    )
    cert = issued_cert(post_pki(server.url, request.der), request, ca_certs)
    assert len(cert.subject) == 0
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value == sans


def test_hand_built_envelope_enrolls(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """The envelope builder used below makes a valid request when nothing is broken."""
    csr = build_csr(rsa_key(0), subject("hand-envelope"), challenge=dev_ca.challenge)
    request = signed_request(hand_envelope(ca_certs[1], csr), rsa_key(0), cn="hand-envelope")
    issued_cert(post_pki(server.url, request.der), request, ca_certs)


@pytest.mark.parametrize(
    "transaction_id",
    [
        hashlib.md5(b"sscep public key").hexdigest().upper(),  # sscep: MD5 of the key, hex
        base64.b64encode(hashlib.sha1(b"micromdm key").digest()).decode(),  # '+', '/', '='
        "1",
        "T" * 256,
    ],
    ids=["hex", "base64", "one-char", "max-length"],
)
def test_transaction_id_styles_are_echoed(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate], transaction_id: str
) -> None:
    """Hex and base64 transactionIDs (interop-quirks #10) come back exactly and are stored."""
    request = new_request(ca_certs, dev_ca.challenge, cn="tid-style", transaction_id=transaction_id)
    assert request.transaction_id == transaction_id
    cert = issued_cert(post_pki(server.url, request.der), request, ca_certs)
    [row] = rows_for(dev_ca, request.transaction_id)
    assert row[2] == request.transaction_id
    assert int(row[0], 16) == cert.serial_number


# ---- refusals after the signature verified: signed FAILURE, nothing stored ----------------


def test_wrong_challenge_is_bad_request(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """A wrong challengePassword: signed badRequest, nothing stored."""
    request = new_request(ca_certs, "not-the-challenge", cn="wrong-challenge")
    expect_failure(dev_ca, server, ca_certs, request, BAD_REQUEST)


def test_missing_challenge_is_bad_request(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """No challengePassword at all while one is required: badRequest."""
    request = new_request(ca_certs, None, cn="no-challenge")
    expect_failure(dev_ca, server, ca_certs, request, BAD_REQUEST)


def _challenge_variant(challenge: str, how: str) -> list[bytes]:
    right = asn1.printable_string(challenge)
    return {
        "duplicated": [challenge_attr(right), challenge_attr(asn1.printable_string("other"))],
        "duplicated-equal": [challenge_attr(right), challenge_attr(right)],
        "two-values": [challenge_attr(right, asn1.printable_string("other"))],
        "no-value": [challenge_attr()],
        "integer": [challenge_attr(asn1.integer(1234))],
        "empty": [challenge_attr(asn1.printable_string(""))],
        "prefix": [challenge_attr(asn1.printable_string(challenge[:-1]))],
        "longer": [challenge_attr(asn1.printable_string(challenge + "x"))],
        "upper-case": [challenge_attr(asn1.printable_string(challenge.upper()))],
    }[how]


@pytest.mark.parametrize(
    "how",
    [
        "duplicated",
        "duplicated-equal",
        "two-values",
        "no-value",
        "integer",
        "empty",
        "prefix",
        "longer",
        "upper-case",
    ],
)
def test_ambiguous_or_wrong_challenge_is_bad_request(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate], how: str
) -> None:
    """Duplicated, multi-valued, mistyped or near-miss challengePasswords never enroll."""
    name = subject(f"challenge-{how}")
    csr = hand_csr(rsa_key(0), name, _challenge_variant(dev_ca.challenge, how))
    request = build_pkcs_req(
        key=rsa_key(0), ca_certs=ca_certs, challenge=None, subject=name, csr=csr
    )
    expect_failure(dev_ca, server, ca_certs, request, BAD_REQUEST)


def test_weak_rsa_csr_key_is_bad_request(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """An RSA-1024 CSR key is refused even when everything else is right."""
    name = subject("rsa-1024")
    csr = build_csr(rsa_key(0, 1024), name, challenge=dev_ca.challenge)
    request = build_pkcs_req(
        key=rsa_key(0, 1024), ca_certs=ca_certs, challenge=None, subject=name, csr=csr
    )
    expect_failure(dev_ca, server, ca_certs, request, BAD_REQUEST)


def _policy_csr(challenge: str, how: str) -> bytes:
    key = rsa_key(0)
    right = challenge_attr(asn1.printable_string(challenge))
    name = subject(f"policy-{how}")
    san = x509.SubjectAlternativeName([x509.DNSName("ok.example.com")]).public_bytes()
    if how == "ca-true":
        ca_true = x509.BasicConstraints(ca=True, path_length=None).public_bytes()
        return hand_csr(key, name, [right, extension_request(("2.5.29.19", True, ca_true))])
    if how == "unknown-critical-extension":
        ext = extension_request(("1.2.3.4.5", True, asn1.NULL))
        return hand_csr(key, name, [right, ext])
    if how == "malformed-extension-request":
        garbage = asn1.attribute(asn1.OID_EXTENSION_REQUEST, asn1.octet_string(b"zz"))
        return hand_csr(key, name, [right, garbage])
    if how == "duplicated-san":
        ext = extension_request(("2.5.29.17", False, san), ("2.5.29.17", False, san))
        return hand_csr(key, name, [right, ext])
    if how == "too-many-sans":
        many = [x509.DNSName(f"h{i}.example.com") for i in range(65)]
        value = x509.SubjectAlternativeName(many).public_bytes()
        return hand_csr(key, name, [right, extension_request(("2.5.29.17", False, value))])
    if how == "control-characters":
        evil = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil\nCN=admin")])
        return hand_csr(key, evil, [right])
    if how == "nul-in-cn":
        return hand_csr(
            key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a\x00b")]), [right]
        )
    if how == "huge-subject":
        units = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "u" * 60) for _ in range(40)]
        return hand_csr(key, x509.Name(units), [right])
    assert how == "empty-subject-no-san"
    return hand_csr(key, x509.Name([]), [right])


POLICY_REFUSALS = [
    "ca-true",
    "unknown-critical-extension",
    "malformed-extension-request",
    "duplicated-san",
    "too-many-sans",
    "control-characters",
    "nul-in-cn",
    "huge-subject",
    "empty-subject-no-san",
]


@pytest.mark.parametrize("how", POLICY_REFUSALS)
def test_csr_policy_refusals_are_bad_request(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate], how: str
) -> None:
    """Well-formed, correctly signed CSRs that policy refuses: badRequest."""
    csr = _policy_csr(dev_ca.challenge, how)
    request = build_pkcs_req(
        key=rsa_key(0), ca_certs=ca_certs, challenge=None, subject=subject(how), csr=csr
    )
    assert len(request.der) < 64 * 1024
    expect_failure(dev_ca, server, ca_certs, request, BAD_REQUEST)


def test_csr_with_broken_signature_is_bad_message_check(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """A CSR whose self-signature does not verify is never issued."""
    name = subject("broken-csr")
    csr = bytearray(build_csr(rsa_key(0), name, challenge=dev_ca.challenge))
    csr[-1] ^= 0x01  # the last octet of the signature BIT STRING
    request = build_pkcs_req(
        key=rsa_key(0), ca_certs=ca_certs, challenge=None, subject=name, csr=bytes(csr)
    )
    expect_failure(dev_ca, server, ca_certs, request, BAD_MESSAGE_CHECK)


@pytest.mark.parametrize(
    "csr",
    [b"\x30\x80" * 20_000, b"not a CSR at all", b"\x30\x03\x02\x01\x00"],
    ids=["deep", "text", "tiny"],
)
def test_undecodable_csr_is_bad_message_check(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate], csr: bytes
) -> None:
    """An envelope that decrypts to something that is not a CSR: badMessageCheck."""
    request = signed_request(hand_envelope(ca_certs[1], csr), rsa_key(0), cn="undecodable")
    assert len(request.der) < 64 * 1024
    expect_failure(dev_ca, server, ca_certs, request, BAD_MESSAGE_CHECK)


def test_envelope_for_an_unrelated_certificate_is_bad_message_check(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """Encrypted to some other RSA certificate instead of the RA: nothing can decrypt it."""
    stranger = self_signed_signer(rsa_key(3), subject("some other server"))
    request = build_pkcs_req(
        key=rsa_key(0),
        ca_certs=[stranger],
        challenge=dev_ca.challenge,
        subject=subject("misaddressed"),
    )
    expect_failure(dev_ca, server, ca_certs, request, BAD_MESSAGE_CHECK)


def _corrupt_key(encrypted_key: bytes, how: str) -> bytes:
    if how == "flipped":
        middle = len(encrypted_key) // 2
        return (
            encrypted_key[:middle]
            + bytes([encrypted_key[middle] ^ 0x5A])
            + encrypted_key[middle + 1 :]
        )
    if how == "above-modulus":
        return b"\xff" * len(encrypted_key)
    if how == "zero":
        return b"\x00" * len(encrypted_key)
    assert how == "short"
    return encrypted_key[:16]


@pytest.mark.parametrize("oaep", [False, True], ids=["pkcs1v15", "oaep"])
@pytest.mark.parametrize("how", ["flipped", "above-modulus", "zero", "short"])
def test_corrupted_encrypted_key_is_bad_message_check(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate], how: str, oaep: bool
) -> None:
    """Garbage in the KTRI encryptedKey is a decrypt failure: badMessageCheck, no 503/500."""
    ra = ca_certs[1]
    ra_public = ra.public_key()
    assert isinstance(ra_public, rsa.RSAPublicKey)
    name = subject(f"bad-key-{how}")
    envelope = cms.seal(
        build_csr(rsa_key(0), name, challenge=dev_ca.challenge),
        recipient_key=ra_public,
        recipient_id=issuer_and_serial(ra),
        cipher=CIPHERS_BY_NAME["aes256"],
        oaep=cms.OaepParams() if oaep else None,
    )
    parsed = asn1_cms.ContentInfo.load(envelope)
    [recipient] = list(parsed["content"]["recipient_infos"])
    encrypted_key = recipient.chosen["encrypted_key"].native
    assert envelope.count(encrypted_key) == 1
    recipient.chosen["encrypted_key"] = _corrupt_key(encrypted_key, how)
    corrupted = parsed.dump(force=True)
    assert encrypted_key not in corrupted
    request = signed_request(corrupted, rsa_key(0), cn=f"bad-key-{how}")
    expect_failure(dev_ca, server, ca_certs, request, BAD_MESSAGE_CHECK)


UNSUPPORTED_CIPHERS = {
    "aes256-gcm": "2.16.840.1.101.3.4.1.46",
    "aes256-ecb": "2.16.840.1.101.3.4.1.41",
    "rc2-cbc": "1.2.840.113549.3.2",
    "unknown": "1.2.3.4.5",
}


@pytest.mark.parametrize("cipher_oid", UNSUPPORTED_CIPHERS.values(), ids=UNSUPPORTED_CIPHERS)
def test_unsupported_content_cipher_is_bad_alg(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate], cipher_oid: str
) -> None:
    """GCM, ECB, RC2 or unknown content ciphers: a signed badAlg."""
    csr = build_csr(rsa_key(0), subject("bad-alg"), challenge=dev_ca.challenge)
    envelope = hand_envelope(ca_certs[1], csr, cipher_oid=cipher_oid)
    request = signed_request(envelope, rsa_key(0), cn="bad-alg")
    expect_failure(dev_ca, server, ca_certs, request, BAD_ALG)


def _broken_envelope(ra: x509.Certificate, csr: bytes, how: str) -> bytes:
    if how == "not-block-multiple":
        key, iv = os.urandom(32), os.urandom(16)
        ciphertext = aes_cbc(key, iv, csr)[:-1]
        return hand_envelope(ra, csr, key=key, iv=iv, ciphertext=ciphertext)
    if how == "single-block":
        return hand_envelope(ra, csr, ciphertext=os.urandom(16))
    if how == "empty-ciphertext":
        return hand_envelope(ra, csr, ciphertext=b"")
    if how == "random-blocks":  # almost surely bad PKCS#7 padding: same answer, no oracle
        return hand_envelope(ra, csr, ciphertext=os.urandom(64))
    if how == "short-iv":
        return hand_envelope(ra, csr, iv_parameter=asn1.octet_string(os.urandom(8)))
    if how == "no-iv":
        return hand_envelope(ra, csr, iv_parameter=asn1.NULL)
    if how == "key-shorter-than-cipher":  # a 16-byte CEK under the AES-256 OID
        return hand_envelope(ra, csr, key=os.urandom(16), cipher_oid=AES256_CBC)
    if how == "key-longer-than-cipher":  # a 32-byte CEK under the AES-128 OID
        return hand_envelope(ra, csr, key=os.urandom(32), cipher_oid=AES128_CBC)
    if how == "kekri-only":
        kekri = asn1.tlv(0xA2, asn1.integer(4) + asn1.seq(asn1.octet_string(b"kek")))
        return hand_envelope(ra, csr, recipient_info=kekri)
    assert how == "empty-csr"
    return hand_envelope(ra, b"")


BROKEN_ENVELOPES = [
    "not-block-multiple",
    "single-block",
    "empty-ciphertext",
    "random-blocks",
    "short-iv",
    "no-iv",
    "key-shorter-than-cipher",
    "key-longer-than-cipher",
    "kekri-only",
    "empty-csr",
]


@pytest.mark.parametrize("how", BROKEN_ENVELOPES)
def test_broken_envelope_is_bad_message_check(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate], how: str
) -> None:
    """Whatever is wrong inside a validly signed envelope: a signed badMessageCheck."""
    csr = build_csr(rsa_key(0), subject(f"broken-{how}"), challenge=dev_ca.challenge)
    request = signed_request(_broken_envelope(ca_certs[1], csr, how), rsa_key(0), cn=how)
    expect_failure(dev_ca, server, ca_certs, request, BAD_MESSAGE_CHECK)


def test_deeply_nested_envelope_is_bad_message_check(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """A validly signed message whose envelope nests 30,000 levels deep: badMessageCheck."""
    request = signed_request(b"\x30\x80" * 30_000, rsa_key(0), cn="deep-envelope")
    assert len(request.der) < 64 * 1024
    expect_failure(dev_ca, server, ca_certs, request, BAD_MESSAGE_CHECK)


@pytest.mark.parametrize(
    ("params", "refusals"),
    [
        (cms.OaepParams("sha256", "sha256"), (BAD_ALG,)),
        (cms.OaepParams("sha512", "sha1"), (BAD_ALG,)),
        # SoftHSM2 fails a labelled OAEP decryption like a bad ciphertext; it can't tell why.
        (cms.OaepParams("sha1", "sha1", b"label"), (BAD_ALG, BAD_MESSAGE_CHECK)),
    ],
    ids=["sha256", "sha512-mgf1-sha1", "sha1-label"],
)
def test_oaep_parameters_the_hsm_lacks_are_refused_in_a_cert_rep(
    server: Server,
    dev_ca: DevCa,
    ca_certs: list[x509.Certificate],
    params: cms.OaepParams,
    refusals: tuple[str, ...],
) -> None:
    """RSAES-OAEP parameters the HSM cannot do: issued, or a signed FAILURE; never a 5xx."""
    ra = ca_certs[1]
    ra_public = ra.public_key()
    assert isinstance(ra_public, rsa.RSAPublicKey)
    name = subject(f"oaep-{params.hash_name}")
    envelope = cms.seal(
        build_csr(rsa_key(0), name, challenge=dev_ca.challenge),
        recipient_key=ra_public,
        recipient_id=issuer_and_serial(ra),
        cipher=CIPHERS_BY_NAME["aes256"],
        oaep=params,
    )
    request = signed_request(envelope, rsa_key(0), cn=f"oaep-{params.hash_name}")
    before = row_count(dev_ca)
    result = open_reply(post_pki(server.url, request.der), request, ca_certs)
    if result.pki_status == SUCCESS:
        assert len(result.certificates) == 1
        assert row_count(dev_ca) == before + 1
    else:
        assert result.pki_status == FAILURE
        assert result.fail_info in refusals
        assert row_count(dev_ca) == before
    # The HSM session that refused is still good for the next client.
    follow_up = new_request(ca_certs, dev_ca.challenge, cn="after-oaep", oaep=True)
    issued_cert(post_pki(server.url, follow_up.der), follow_up, ca_certs)


@pytest.mark.parametrize("message_type", ["3", "20", "99"])
def test_unsupported_message_type_is_bad_request(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate], message_type: str
) -> None:
    """CertRep, CertPoll or unknown messageTypes: badRequest (GetCert/GetCRL: test_revocation)."""
    request = new_request(
        ca_certs, dev_ca.challenge, cn=f"type-{message_type}", message_type=message_type
    )
    expect_failure(dev_ca, server, ca_certs, request, BAD_REQUEST)


# ---- refusals before the signature verified: HTTP 4xx, nothing stored ---------------------


def test_tampered_client_signature_is_http_400(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """One flipped bit in the SignerInfo signature: no CertRep, a plain-text 400."""
    request = new_request(ca_certs, dev_ca.challenge, cn="tampered")
    der = bytearray(request.der)
    der[-1] ^= 0x01  # the signature OCTET STRING ends the SignedData
    expect_http_400(dev_ca, server, bytes(der))
    assert rows_for(dev_ca, request.transaction_id) == []
    # The untouched request still enrolls, so it was the flipped bit that was refused.
    issued_cert(post_pki(server.url, request.der), request, ca_certs)


@pytest.mark.parametrize("cut", [1, 2, 4, 16, 100, 0.25, 0.5, 0.9, -64, -1])
def test_truncated_message_is_http_400(
    server: Server,
    dev_ca: DevCa,
    ca_certs: list[x509.Certificate],
    cut: float,
) -> None:
    """A valid pkiMessage cut short anywhere: a plain 400, nothing stored."""
    request = new_request(ca_certs, dev_ca.challenge, cn="truncated")
    length = len(request.der)
    end = int(length * cut) if isinstance(cut, float) else cut % length
    assert 0 < end < length
    expect_http_400(dev_ca, server, request.der[:end])


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00",
        b"hello, SCEP",
        b"-----BEGIN PKCS7-----\nMIIB\n-----END PKCS7-----\n",
        b"\x30\x82\xff\xff" + b"\x00" * 64,  # length far beyond the data
        b"\x30\x84\x7f\xff\xff\xff\x02\x01\x00",  # a 2 GiB length
        b"\x30\x03\x02\x01\x00\xde\xad",  # trailing garbage
        bytes(range(256)) * 16,
    ],
    ids=["empty", "nul", "text", "pem", "long-length", "huge-length", "trailing", "bytes"],
)
def test_garbage_is_http_400(server: Server, dev_ca: DevCa, body: bytes) -> None:
    """Bodies that are not DER (or lie about their lengths): a plain 400."""
    expect_http_400(dev_ca, server, body)


def test_garbage_after_a_valid_message_is_http_400(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """Trailing bytes after a valid SignedData: refused, not ignored."""
    request = new_request(ca_certs, dev_ca.challenge, cn="trailing-garbage")
    expect_http_400(dev_ca, server, request.der + b"\x00\x00garbage")
    assert rows_for(dev_ca, request.transaction_id) == []


def test_oversized_body_is_http_413(server: Server, dev_ca: DevCa) -> None:
    """Past the default 64 KiB cap, with Content-Length or chunked: 413, nothing stored."""
    before = row_count(dev_ca)
    body = b"\x30\x80" * (32 * 1024 + 1)
    response = post_pki(server.url, body)
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("text/plain")

    def chunks() -> Any:
        for _ in range(80):
            yield b"\x00" * 1024

    chunked = httpx.post(
        f"{server.url}/scep?operation=PKIOperation", content=chunks(), timeout=TIMEOUT
    )
    assert chunked.status_code == 413
    assert row_count(dev_ca) == before


# ---- retries and load ---------------------------------------------------------------------


def test_resend_returns_the_same_certificate(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate]
) -> None:
    """Same transactionID and key: the stored certificate again; another key: badRequest."""
    transaction_id = secrets.token_hex(16)
    first = new_request(
        ca_certs, dev_ca.challenge, cn="resend", key_index=4, transaction_id=transaction_id
    )
    before = row_count(dev_ca)
    cert = issued_cert(post_pki(server.url, first.der), first, ca_certs)

    again = new_request(
        ca_certs, dev_ca.challenge, cn="resend", key_index=4, transaction_id=transaction_id
    )
    assert again.sender_nonce != first.sender_nonce and again.signer_cert != first.signer_cert
    repeat = issued_cert(post_pki(server.url, again.der), again, ca_certs)
    assert repeat.serial_number == cert.serial_number
    assert repeat.public_bytes(Encoding.DER) == cert.public_bytes(Encoding.DER)
    assert row_count(dev_ca) == before + 1
    [row] = rows_for(dev_ca, transaction_id)
    assert int(row[0], 16) == cert.serial_number

    other = new_request(
        ca_certs, dev_ca.challenge, cn="resend", key_index=5, transaction_id=transaction_id
    )
    before_other = row_count(dev_ca)
    result = open_reply(post_pki(server.url, other.der), other, ca_certs)
    assert (result.pki_status, result.fail_info) == (FAILURE, BAD_REQUEST)
    assert row_count(dev_ca) == before_other
    assert len(rows_for(dev_ca, transaction_id)) == 1


def test_concurrent_resends_share_one_certificate(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate], http: httpx.Client
) -> None:
    """The same PKCSReq retried 6 times at once: 6 SUCCESS, one certificate, one row."""
    transaction_id = secrets.token_hex(16)
    requests = [
        new_request(
            ca_certs, dev_ca.challenge, cn="retry-storm", key_index=6, transaction_id=transaction_id
        )
        for _ in range(6)
    ]
    before = row_count(dev_ca)
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        responses = list(pool.map(lambda r: post_pki(server.url, r.der, http), requests))
    certs = [
        issued_cert(resp, req, ca_certs) for resp, req in zip(responses, requests, strict=True)
    ]
    assert len({c.public_bytes(Encoding.DER) for c in certs}) == 1
    assert row_count(dev_ca) == before + 1
    [row] = rows_for(dev_ca, transaction_id)
    assert row[3] == certs[0].public_bytes(Encoding.DER)


BURST = 40


def test_concurrent_burst_all_succeed_with_distinct_serials(
    server: Server, dev_ca: DevCa, ca_certs: list[x509.Certificate], http: httpx.Client
) -> None:
    """40 enrollments at once: all SUCCESS, 40 distinct serials, 40 stored rows."""
    requests = [
        new_request(ca_certs, dev_ca.challenge, cn=f"burst-{i}", key_index=10 + i % 4)
        for i in range(BURST)
    ]
    before = row_count(dev_ca)
    with ThreadPoolExecutor(max_workers=BURST) as pool:
        responses = list(pool.map(lambda r: post_pki(server.url, r.der, http), requests))
    certs = [
        issued_cert(resp, req, ca_certs) for resp, req in zip(responses, requests, strict=True)
    ]
    serials = {c.serial_number for c in certs}
    assert len(serials) == BURST
    for index, (cert, request) in enumerate(zip(certs, requests, strict=True)):
        assert cert.subject == subject(f"burst-{index}")
        assert spki(cert.public_key()) == spki(request.key.public_key())
        [row] = rows_for(dev_ca, request.transaction_id)
        assert int(row[0], 16) == cert.serial_number
        assert row[3] == cert.public_bytes(Encoding.DER)
    assert row_count(dev_ca) == before + BURST
