"""hsmscep.testing.client: PKCSReq round trips through the server's parser, CertRep verification."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import csr as asn1_csr
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import AttributeOID, NameOID

from hsmscep.errors import MessageError
from hsmscep.protocol import asn1, cms, message
from hsmscep.protocol.algorithms import CIPHERS_BY_NAME, DIGESTS_BY_NAME
from hsmscep.testing import client

NOW = datetime.now(UTC)
SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-0001")])
SANS: list[x509.GeneralName] = [
    x509.DNSName("device-0001.example.com"),
    x509.RFC822Name("ops@example.com"),
    x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
    x509.UniformResourceIdentifier("tag:microsoft.com,2022-09-14:sid:S-1-5-21-1"),
]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name | None = None,
    issuer_key: rsa.RSAPrivateKey | None = None,
    *,
    ca: bool = False,
    key_usage: x509.KeyUsage | None = None,
    serial: int = 1000,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _key_usage(*, sign: bool, encipher: bool, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=encipher,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@pytest.fixture(scope="module")
def ca_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ra_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def client_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ca_cert(ca_key: rsa.RSAPrivateKey) -> x509.Certificate:
    usage = _key_usage(sign=True, encipher=False, cert_sign=True)
    return _cert(_name("Test SCEP CA"), ca_key, ca=True, key_usage=usage, serial=1)


@pytest.fixture(scope="module")
def ra_cert(
    ra_key: rsa.RSAPrivateKey, ca_key: rsa.RSAPrivateKey, ca_cert: x509.Certificate
) -> x509.Certificate:
    usage = _key_usage(sign=True, encipher=True)
    return _cert(_name("Test SCEP RA"), ra_key, ca_cert.subject, ca_key, key_usage=usage, serial=2)


@pytest.fixture(scope="module")
def ca_certs(ca_cert: x509.Certificate, ra_cert: x509.Certificate) -> list[x509.Certificate]:
    return [ca_cert, ra_cert]


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


# ---- GetCACert ----------------------------------------------------------------------------


def test_parse_ca_certs_single_der(ca_cert: x509.Certificate) -> None:
    assert client.parse_ca_certs(_der(ca_cert)) == [ca_cert]


def test_parse_ca_certs_pkcs7_keeps_order(
    ca_cert: x509.Certificate, ra_cert: x509.Certificate
) -> None:
    for order in ([ra_cert, ca_cert], [ca_cert, ra_cert]):
        body = cms.certs_only([_der(c) for c in order])
        assert client.parse_ca_certs(body) == order


@pytest.mark.parametrize("body", [b"", b"\x30\x00", b"not DER at all", cms.certs_only([])])
def test_parse_ca_certs_rejects_junk(body: bytes) -> None:
    with pytest.raises(MessageError):
        client.parse_ca_certs(body)


def test_select_recipient_prefers_encrypting_ra(
    ca_cert: x509.Certificate, ra_cert: x509.Certificate
) -> None:
    assert client.select_recipient([ca_cert, ra_cert]) == ra_cert
    assert client.select_recipient([ra_cert, ca_cert]) == ra_cert
    assert client.select_recipient([ca_cert]) == ca_cert


def test_select_recipient_skips_signing_only_ra(
    ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey, ra_key: rsa.RSAPrivateKey
) -> None:
    usage = _key_usage(sign=True, encipher=False)
    signing_ra = _cert(_name("signing RA"), ra_key, ca_cert.subject, ca_key, key_usage=usage)
    assert client.select_recipient([signing_ra, ca_cert]) == ca_cert
    with pytest.raises(MessageError):
        client.select_recipient([])


# ---- PKCSReq ------------------------------------------------------------------------------


def _open_request(
    der: bytes, ca_certs: Sequence[x509.Certificate], key: rsa.RSAPrivateKey
) -> tuple[message.PkiRequest, cms.Envelope, bytes]:
    """What the server does: verify, find our RecipientInfo, decrypt the CEK, open."""
    req = message.decode_pki_message(der)
    envelope = cms.decode_envelope(req.content)
    recipient = client.select_recipient(ca_certs)
    [kt] = envelope.recipients
    assert kt.recipient.matches(cms.CertId.of(_der(recipient)))
    pad = padding.PKCS1v15() if kt.oaep is None else kt.oaep.padding()
    return req, envelope, envelope.open(key.decrypt(kt.encrypted_key, pad))


def _verify_csr_signature(der: bytes, public_key: rsa.RSAPublicKey, digest: str) -> None:
    # Checked by hand: cryptography's is_signature_valid is False for any SHA-1 signature.
    csr = asn1_csr.CertificationRequest.load(der)
    assert csr["signature_algorithm"].hash_algo == digest
    signature, signed = csr["signature"].native, csr["certification_request_info"].dump()
    public_key.verify(signature, signed, padding.PKCS1v15(), DIGESTS_BY_NAME[digest].hash())


@pytest.mark.parametrize(
    ("digest", "cipher", "oaep"),
    [
        ("sha1", "des3", False),
        ("sha1", "des", False),  # single DES: legacy, read by the server but never written
        ("sha224", "aes128", True),
        ("sha256", "aes256", False),
        ("sha384", "aes192", True),
        ("sha512", "aes256", True),
    ],
)
def test_pkcs_req_round_trip(
    digest: str,
    cipher: str,
    oaep: bool,
    client_key: rsa.RSAPrivateKey,
    ra_key: rsa.RSAPrivateKey,
    ca_certs: list[x509.Certificate],
) -> None:
    built = client.build_pkcs_req(
        key=client_key,
        ca_certs=ca_certs,
        challenge="s3cret-Challenge",
        subject=SUBJECT,
        sans=SANS,
        digest=digest,
        cipher=cipher,
        oaep=oaep,
    )
    req, envelope, csr_der = _open_request(built.der, ca_certs, ra_key)
    assert req.message_type == "19"
    assert req.transaction_id == built.transaction_id
    assert req.sender_nonce == built.sender_nonce
    assert req.digest == DIGESTS_BY_NAME[digest]
    assert req.signer_cert == built.signer_cert
    assert envelope.cipher == CIPHERS_BY_NAME[cipher]
    assert (envelope.recipients[0].oaep is not None) is oaep

    _verify_csr_signature(csr_der, client_key.public_key(), digest)
    csr = x509.load_der_x509_csr(csr_der)
    assert csr.subject == SUBJECT
    assert csr.public_key() == client_key.public_key()
    challenge = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
    assert challenge.value == b"s3cret-Challenge"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == SANS


def test_pkcs_req_defaults(
    client_key: rsa.RSAPrivateKey, ra_key: rsa.RSAPrivateKey, ca_certs: list[x509.Certificate]
) -> None:
    a = client.build_pkcs_req(key=client_key, ca_certs=ca_certs, challenge=None, subject=SUBJECT)
    b = client.build_pkcs_req(key=client_key, ca_certs=ca_certs, challenge=None, subject=SUBJECT)
    assert len(a.transaction_id) == 32 and int(a.transaction_id, 16) >= 0
    assert a.transaction_id != b.transaction_id
    assert len(a.sender_nonce) == 16 and a.sender_nonce != b.sender_nonce
    assert a.key is client_key
    # The default signer certificate: self-signed, the CSR subject, one day.
    signer = a.signer_cert
    assert signer.subject == signer.issuer == SUBJECT
    assert signer.public_key() == client_key.public_key()
    signer.verify_directly_issued_by(signer)
    assert signer.not_valid_after_utc - signer.not_valid_before_utc <= timedelta(days=1, hours=1)
    req, envelope, csr_der = _open_request(a.der, ca_certs, ra_key)
    assert req.digest.name == "sha256"
    assert envelope.cipher.name == "aes256"
    assert envelope.recipients[0].oaep is None
    csr = x509.load_der_x509_csr(csr_der)
    assert not any(a.oid == AttributeOID.CHALLENGE_PASSWORD for a in csr.attributes)
    assert not list(csr.extensions)


@pytest.mark.parametrize(
    ("utf8", "string_type"), [(False, "printable_string"), (True, "utf8_string")]
)
def test_challenge_string_type(
    utf8: bool,
    string_type: str,
    client_key: rsa.RSAPrivateKey,
    ra_key: rsa.RSAPrivateKey,
    ca_certs: list[x509.Certificate],
) -> None:
    built = client.build_pkcs_req(
        key=client_key,
        ca_certs=ca_certs,
        challenge="pass word",
        subject=SUBJECT,
        challenge_as_utf8=utf8,
    )
    _, _, csr_der = _open_request(built.der, ca_certs, ra_key)
    attrs = asn1_csr.CertificationRequest.load(csr_der)["certification_request_info"]["attributes"]
    [attr] = [a for a in attrs if a["type"].dotted == asn1.OID_CHALLENGE_PASSWORD]
    value = attr["values"][0]
    assert value.native == "pass word"
    assert value.name == string_type


def test_given_csr_and_signer_are_used(
    client_key: rsa.RSAPrivateKey, ca_key: rsa.RSAPrivateKey, ca_cert: x509.Certificate
) -> None:
    csr = client.build_csr(client_key, _name("from elsewhere"), challenge="x", digest="sha1")
    # A renewal: signed with a certificate the CA issued earlier (interop-quirks #11).
    old = _cert(_name("old device cert"), client_key, ca_cert.subject, ca_key, serial=77)
    built = client.build_pkcs_req(
        key=client_key,
        ca_certs=[ca_cert],
        challenge=None,
        subject=SUBJECT,
        signer_cert=old,
        transaction_id="tx-renew-1",
        message_type="17",
        csr=csr,
    )
    assert built.signer_cert is old
    req, _, csr_der = _open_request(built.der, [ca_cert], ca_key)
    assert csr_der == csr
    assert (req.message_type, req.transaction_id, req.signer_serial) == ("17", "tx-renew-1", 77)


def test_unknown_algorithm_names(
    client_key: rsa.RSAPrivateKey, ca_certs: list[x509.Certificate]
) -> None:
    with pytest.raises(ValueError, match="unknown cipher 'rc2'"):
        client.build_pkcs_req(
            key=client_key, ca_certs=ca_certs, challenge=None, subject=SUBJECT, cipher="rc2"
        )
    with pytest.raises(ValueError, match="unknown digest 'md5'"):
        client.build_pkcs_req(
            key=client_key, ca_certs=ca_certs, challenge=None, subject=SUBJECT, digest="md5"
        )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_verifies_pkcs_req(
    tmp_path: Path, client_key: rsa.RSAPrivateKey, ca_certs: list[x509.Certificate]
) -> None:
    built = client.build_pkcs_req(
        key=client_key, ca_certs=ca_certs, challenge="c", subject=SUBJECT, digest="sha512"
    )
    (tmp_path / "req.der").write_bytes(built.der)
    done = subprocess.run(
        ["openssl", "cms", "-verify", "-noverify", "-inform", "DER", "-in", "req.der"],
        cwd=tmp_path,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == message.decode_pki_message(built.der).content


# ---- CertRep ------------------------------------------------------------------------------

SHA256_WITH_RSA = "1.2.840.113549.1.1.11"


@pytest.fixture(scope="module")
def issued(
    client_key: rsa.RSAPrivateKey, ca_key: rsa.RSAPrivateKey, ca_cert: x509.Certificate
) -> x509.Certificate:
    return _cert(SUBJECT, client_key, ca_cert.subject, ca_key, serial=4242)


@pytest.fixture(scope="module")
def request_(
    client_key: rsa.RSAPrivateKey, ca_certs: list[x509.Certificate]
) -> client.ClientRequest:
    return client.build_pkcs_req(
        key=client_key, ca_certs=ca_certs, challenge="c", subject=SUBJECT, sans=SANS
    )


def _issuer_and_serial(cert: x509.Certificate) -> bytes:
    return cms.issuer_and_serial(cert.issuer.public_bytes(), cert.serial_number)


def _cert_rep(
    request: client.ClientRequest,
    signer_key: rsa.RSAPrivateKey,
    signer_cert: x509.Certificate,
    *,
    issued: Sequence[x509.Certificate] = (),
    status: str = "0",
    fail_info: str | None = None,
    transaction_id: str | None = None,
    recipient_nonce: bytes | None = None,
    sender_nonce: bytes | None = b"server nonce 16b",
    message_type: str = "3",
    recipient: x509.Certificate | None = None,
    oaep: bool = False,
    cipher: str = "aes128",
    digest: str = "sha256",
    signature_oid: str = asn1.OID_RSA_ENCRYPTION,
    signer_id: bytes | None = None,
) -> bytes:
    """A CertRep as a server builds it: cms.seal + cms.certs_only + cms.signed_data."""
    content = None
    if issued:
        recipient = recipient or request.signer_cert
        recipient_key = recipient.public_key()
        assert isinstance(recipient_key, rsa.RSAPublicKey)
        content = cms.seal(
            cms.certs_only([_der(c) for c in issued]),
            recipient_key=recipient_key,
            recipient_id=_issuer_and_serial(recipient),
            cipher=CIPHERS_BY_NAME[cipher],
            oaep=cms.OaepParams() if oaep else None,
        )
    algorithm = DIGESTS_BY_NAME[digest]
    digest_value = hashes.Hash(algorithm.hash())
    digest_value.update(content or b"")
    attrs = [
        asn1.attribute(asn1.OID_CONTENT_TYPE, asn1.oid(asn1.OID_DATA)),
        asn1.attribute(asn1.OID_MESSAGE_DIGEST, asn1.octet_string(digest_value.finalize())),
        asn1.attribute(asn1.OID_MESSAGE_TYPE, asn1.printable_string(message_type)),
        asn1.attribute(asn1.OID_PKI_STATUS, asn1.printable_string(status)),
        asn1.attribute(
            asn1.OID_TRANSACTION_ID,
            asn1.printable_string(transaction_id or request.transaction_id),
        ),
        asn1.attribute(
            asn1.OID_RECIPIENT_NONCE,
            asn1.octet_string(recipient_nonce or request.sender_nonce),
        ),
    ]
    if sender_nonce is not None:
        attrs.append(asn1.attribute(asn1.OID_SENDER_NONCE, asn1.octet_string(sender_nonce)))
    if fail_info is not None:
        attrs.append(asn1.attribute(asn1.OID_FAIL_INFO, asn1.printable_string(fail_info)))
    signed_attrs = asn1.set_of(*attrs)
    return cms.signed_data(
        content=content,
        digest=algorithm,
        signed_attrs=signed_attrs,
        signature=signer_key.sign(signed_attrs, padding.PKCS1v15(), algorithm.hash()),
        signature_algorithm=asn1.algorithm_identifier(signature_oid),
        signer_id=signer_id or _issuer_and_serial(signer_cert),
        certs_der=[_der(signer_cert)],
    )


@pytest.mark.parametrize(
    ("oaep", "cipher", "digest", "signature_oid"),
    [
        (False, "aes128", "sha256", asn1.OID_RSA_ENCRYPTION),
        (True, "aes256", "sha256", SHA256_WITH_RSA),
        (False, "des3", "sha1", asn1.OID_RSA_ENCRYPTION),
        (True, "aes192", "sha512", asn1.OID_RSA_ENCRYPTION),
    ],
)
def test_open_cert_rep_success(
    oaep: bool,
    cipher: str,
    digest: str,
    signature_oid: str,
    request_: client.ClientRequest,
    ra_key: rsa.RSAPrivateKey,
    ra_cert: x509.Certificate,
    ca_certs: list[x509.Certificate],
    issued: x509.Certificate,
) -> None:
    der = _cert_rep(
        request_,
        ra_key,
        ra_cert,
        issued=[issued],
        oaep=oaep,
        cipher=cipher,
        digest=digest,
        signature_oid=signature_oid,
    )
    result = client.open_cert_rep(der, request_, ca_certs)
    assert result == client.CertRepResult("0", None, [issued], ra_cert)


def test_open_cert_rep_keeps_certificate_order(
    request_: client.ClientRequest,
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    issued: x509.Certificate,
) -> None:
    # Signed by the CA itself (no RA), chain included, leaf first (interop-quirks #7).
    der = _cert_rep(request_, ca_key, ca_cert, issued=[issued, ca_cert])
    result = client.open_cert_rep(der, request_, [ca_cert])
    assert result.certificates == [issued, ca_cert]
    assert result.signer_cert == ca_cert


def test_open_cert_rep_subject_key_id_signer(
    request_: client.ClientRequest,
    ra_key: rsa.RSAPrivateKey,
    ra_cert: x509.Certificate,
    ca_certs: list[x509.Certificate],
    issued: x509.Certificate,
) -> None:
    ski = ra_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    sid = asn1.tlv(0x80, ski)  # SignerIdentifier [0] IMPLICIT SubjectKeyIdentifier
    der = _cert_rep(request_, ra_key, ra_cert, issued=[issued], signer_id=sid)
    assert client.open_cert_rep(der, request_, ca_certs).certificates == [issued]


@pytest.mark.parametrize(("status", "fail_info"), [("2", "2"), ("2", "4"), ("3", None)])
def test_open_cert_rep_failure_and_pending(
    status: str,
    fail_info: str | None,
    request_: client.ClientRequest,
    ra_key: rsa.RSAPrivateKey,
    ra_cert: x509.Certificate,
    ca_certs: list[x509.Certificate],
) -> None:
    der = _cert_rep(request_, ra_key, ra_cert, status=status, fail_info=fail_info)
    result = client.open_cert_rep(der, request_, ca_certs)
    assert result == client.CertRepResult(status, fail_info, [], ra_cert)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"transaction_id": "someone-else"}, "transactionID"),
        ({"recipient_nonce": b"\x00" * 16}, "recipientNonce"),
        ({"sender_nonce": None}, "senderNonce"),
        ({"message_type": "19"}, "messageType"),
        ({"status": "2"}, "failInfo"),
        ({"status": "9"}, "pkiStatus"),
        ({"issued": ()}, "envelope"),  # SUCCESS without content
        ({"digest": "sha1", "signature_oid": SHA256_WITH_RSA}, "signature algorithm"),
    ],
)
def test_open_cert_rep_mismatch(
    changes: dict[str, object],
    error: str,
    request_: client.ClientRequest,
    ra_key: rsa.RSAPrivateKey,
    ra_cert: x509.Certificate,
    ca_certs: list[x509.Certificate],
    issued: x509.Certificate,
) -> None:
    kwargs: dict[str, object] = {"issued": [issued], **changes}
    der = _cert_rep(request_, ra_key, ra_cert, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(MessageError, match=error):
        client.open_cert_rep(der, request_, ca_certs)


def test_open_cert_rep_tampered(
    request_: client.ClientRequest,
    ra_key: rsa.RSAPrivateKey,
    ra_cert: x509.Certificate,
    ca_certs: list[x509.Certificate],
    issued: x509.Certificate,
) -> None:
    der = _cert_rep(request_, ra_key, ra_cert, issued=[issued])
    assert client.open_cert_rep(der, request_, ca_certs).certificates == [issued]
    # The signature is the last field of the message.
    bad_signature = der[:-1] + bytes((der[-1] ^ 1,))
    with pytest.raises(MessageError, match="signature does not verify"):
        client.open_cert_rep(bad_signature, request_, ca_certs)
    # A content byte: the signature still holds, the messageDigest does not.
    content = message.decode_pki_message(der).content
    at = der.index(content) + len(content) // 2
    bad_content = der[:at] + bytes((der[at] ^ 1,)) + der[at + 1 :]
    with pytest.raises(MessageError, match="messageDigest"):
        client.open_cert_rep(bad_content, request_, ca_certs)
    for cut in (0, 1, 20, len(der) // 2, len(der) - 1):
        with pytest.raises(MessageError):
            client.open_cert_rep(der[:cut], request_, ca_certs)
    with pytest.raises(MessageError):
        client.open_cert_rep(der + b"\x00", request_, ca_certs)


def test_open_cert_rep_untrusted_signer(
    request_: client.ClientRequest,
    client_key: rsa.RSAPrivateKey,
    ra_key: rsa.RSAPrivateKey,
    ra_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    ca_certs: list[x509.Certificate],
    issued: x509.Certificate,
) -> None:
    der = _cert_rep(request_, ra_key, ra_cert, issued=[issued])
    with pytest.raises(MessageError, match="trusted"):
        client.open_cert_rep(der, request_, [ca_cert])
    # An impostor with the RA's issuer and serial but its own key, embedded in the message.
    impostor = _cert(ra_cert.subject, client_key, ca_cert.subject, client_key, serial=2)
    der = _cert_rep(request_, client_key, impostor, issued=[issued])
    with pytest.raises(MessageError, match="signature does not verify"):
        client.open_cert_rep(der, request_, ca_certs)


def test_open_cert_rep_not_for_us(
    request_: client.ClientRequest,
    ra_key: rsa.RSAPrivateKey,
    ra_cert: x509.Certificate,
    ca_cert: x509.Certificate,
    ca_certs: list[x509.Certificate],
    issued: x509.Certificate,
) -> None:
    der = _cert_rep(request_, ra_key, ra_cert, issued=[issued], recipient=ca_cert)
    with pytest.raises(MessageError, match="not addressed"):
        client.open_cert_rep(der, request_, ca_certs)
    # Addressed to our signer certificate, but we hold another key.
    der = _cert_rep(request_, ra_key, ra_cert, issued=[issued])
    wrong_key = client.ClientRequest(
        b"", request_.transaction_id, request_.sender_nonce, ra_key, request_.signer_cert
    )
    with pytest.raises(MessageError):
        client.open_cert_rep(der, wrong_key, ca_certs)
