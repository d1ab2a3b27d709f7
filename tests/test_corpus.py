"""The robustness corpus (tests/corpus.py) against the real app in process (tests/inprocess.py):
every case gets its documented answer (robustness.md), and none reaches the service's
catch-all ("internal error"), whose log line would fail the test.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from hsmscep.protocol import asn1
from hsmscep.protocol.codes import FailInfo
from hsmscep.testing import requests as client
from hsmscep.testing.cacerts import parse_ca_certs
from hsmscep.testing.replies import open_cert_rep, verify_signed_message
from tests import corpus
from tests.conftest import DevCa, Server
from tests.corpus import Case, Expect
from tests.inprocess import SoftCa, serve, soft_ca

BAD_MESSAGE_CHECK = str(FailInfo.BAD_MESSAGE_CHECK.value)
BAD_REQUEST = str(FailInfo.BAD_REQUEST.value)
# A Python exception class in a client-facing text is an implementation leak.
EXCEPTION_NAME = re.compile(r"[A-Z][a-z]+(Error|Exception)\b")
PKI = {"Content-Type": "application/x-pki-message"}


class CatchAll(logging.Handler):
    """Collects what reaches the service's last-resort refusal."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> SoftCa:
    return soft_ca(tmp_path_factory.mktemp("corpus"), "corpus-ca")


@pytest.fixture(scope="module")
def http(ca: SoftCa) -> Iterator[httpx.Client]:
    with serve(ca) as http:
        yield http


@pytest.fixture(scope="module")
def ca_certs(http: httpx.Client) -> list[x509.Certificate]:
    return parse_ca_certs(http.get("/scep?operation=GetCACert").content)


@pytest.fixture
def catch_all() -> Iterator[CatchAll]:
    handler = CatchAll()
    logger = logging.getLogger("hsmscep.service.refusal")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]


def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


KEYS = [key() for _ in range(3)]


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def valid(
    ca: SoftCa, ca_certs: list[x509.Certificate], cn: str, k: int = 0
) -> client.ClientRequest:
    return client.build_pkcs_req(
        key=KEYS[k], ca_certs=ca_certs, challenge=ca.challenge, subject=name(cn)
    )


def post(http: httpx.Client, body: bytes) -> httpx.Response:
    return http.post("/scep?operation=PKIOperation", content=body, headers=PKI)


def answer(http: httpx.Client, case: Case, ca_certs: list[x509.Certificate]) -> tuple[str, str]:
    """("http", status) for a 4xx, ("certrep", status:failInfo) for a CertRep; else it fails."""
    response = post(http, case.body)
    if response.status_code == 200:
        signed = verify_signed_message(response.content, ca_certs[1:])
        status = signed.attributes[asn1.OID_PKI_STATUS]
        fail_info = signed.attributes.get(asn1.OID_FAIL_INFO)
        return "certrep", f"{status}:{fail_info}"
    assert 400 <= response.status_code < 500, (case.name, response.status_code, response.text)
    assert response.headers["content-type"].startswith("text/plain"), case.name
    assert not EXCEPTION_NAME.search(response.text), (case.name, response.text)
    return "http", str(response.status_code)


def check(http: httpx.Client, case: Case, ca_certs: list[x509.Certificate]) -> None:
    kind, value = answer(http, case, ca_certs)
    if case.expect is Expect.REFUSED_HTTP:
        assert kind == "http", (case.name, value)
    elif case.expect is Expect.FAILURE:
        assert (kind, value) == ("certrep", f"2:{case.fail_info}"), case.name
    elif kind == "certrep":
        assert value.startswith("2:") or value == "0:None", (case.name, value)


def test_structural_mutations_of_a_valid_request(
    http: httpx.Client, ca: SoftCa, ca_certs: list[x509.Certificate], catch_all: CatchAll
) -> None:
    """Truncations, corrupted lengths and tags at sampled boundaries of a valid PKCSReq."""
    der = valid(ca, ca_certs, "structural").der
    cases = list(corpus.structural(der))
    assert len(cases) > 200
    for case in cases:
        check(http, case, ca_certs)


def test_nesting_and_oversize(
    http: httpx.Client, ca_certs: list[x509.Certificate], catch_all: CatchAll
) -> None:
    for case in corpus.nesting():
        check(http, case, ca_certs)
    assert post(http, b"\x30\x84\x00\x01\x00\x00" + b"\x00" * 70_000).status_code == 413


def test_tampered_signature_and_content(
    http: httpx.Client, ca: SoftCa, ca_certs: list[x509.Certificate], catch_all: CatchAll
) -> None:
    """A flipped bit in the signature, or in the signed envelope, never verifies: 400."""
    der = valid(ca, ca_certs, "tampered").der
    for offset in (len(der) - 5, len(der) // 2, 200):
        body = bytearray(der)
        body[offset] ^= 0x01
        check(http, Case(f"flip-{offset}", bytes(body), Expect.REFUSED_HTTP), ca_certs)


def test_tampered_envelopes_get_bad_message_check(
    http: httpx.Client, ca: SoftCa, ca_certs: list[x509.Certificate], catch_all: CatchAll
) -> None:
    """Validly signed, but the envelope inside is broken: a signed FAILURE, never issued."""
    ra, signer = ca_certs[1], client.self_signed_signer(KEYS[0], name("env"))
    csr = client.build_csr(KEYS[0], name("env"), challenge=ca.challenge)
    envelope = corpus.sealed(csr, ra, corpus.ra_id(ra))
    bodies = {
        "ciphertext-flipped": envelope[:-3] + bytes([envelope[-3] ^ 0xFF]) + envelope[-2:],
        "not-an-envelope": asn1.seq(asn1.integer(1)),
        "deep-envelope": b"\x30\x80" * 20_000,
        "not-our-recipient": corpus.sealed(
            csr, ra, asn1.seq(ra.subject.public_bytes(), b"\x02\x01\x05")
        ),
        "csr-garbage": corpus.sealed(b"not a CSR", ra, corpus.ra_id(ra)),
        "csr-truncated": corpus.sealed(csr[:-40], ra, corpus.ra_id(ra)),
        **{
            f"recipient-{label}": corpus.sealed(
                csr, ra, asn1.seq(issuer, asn1.integer(ra.serial_number))
            )
            for label, issuer in corpus.BROKEN_ISSUERS.items()
        },
    }
    for label, content in bodies.items():
        body = corpus.signed_with(KEYS[0], signer, content)
        check(http, Case(label, body, Expect.FAILURE, BAD_MESSAGE_CHECK), ca_certs)


def test_odd_csr_subjects_are_refused_precisely(
    http: httpx.Client, ca: SoftCa, ca_certs: list[x509.Certificate], catch_all: CatchAll
) -> None:
    """Subjects that do not load or cannot be issued: a signed FAILURE, not the catch-all."""
    ra, signer = ca_certs[1], client.self_signed_signer(KEYS[0], name("odd"))
    for label, subject in corpus.BROKEN_ISSUERS.items():
        csr = corpus.csr_with_subject(KEYS[0], subject, ca.challenge)
        body = corpus.signed_with(KEYS[0], signer, corpus.sealed(csr, ra, corpus.ra_id(ra)))
        kind, value = answer(http, Case(label, body, Expect.FAILURE), ca_certs)
        assert kind == "certrep" and value in (f"2:{BAD_MESSAGE_CHECK}", f"2:{BAD_REQUEST}"), (
            label,
            value,
        )


def test_key_binding(
    http: httpx.Client, ca: SoftCa, ca_certs: list[x509.Certificate], catch_all: CatchAll
) -> None:
    """RFC 8894 §2.3: an initial PKCSReq is signed by a self-signed certificate with the CSR's
    key. A CSR of another key, a lifted envelope re-signed by a third party, and a signer
    certificate issued by someone else are refused (badMessageCheck); the device's own
    request still issues afterwards."""
    ra = ca_certs[1]
    device = valid(ca, ca_certs, "device-1", k=0)
    lifted = corpus.nodes(device.der)
    # The envelope is the signed content: the OCTET STRING inside encapContentInfo.
    envelope = next(
        device.der[n.start + n.header : n.end]
        for n in lifted
        if device.der[n.start] == 0x04 and device.der[n.start + n.header] == 0x30
    )
    thief_signer = client.self_signed_signer(KEYS[1], name("device-1"))
    resigned = corpus.signed_with(KEYS[1], thief_signer, envelope)
    check(http, Case("re-signed", resigned, Expect.FAILURE, BAD_MESSAGE_CHECK), ca_certs)

    csr = client.build_csr(KEYS[0], name("other-key"), challenge=ca.challenge)
    mismatched = corpus.signed_with(KEYS[1], thief_signer, corpus.sealed(csr, ra, corpus.ra_id(ra)))
    check(http, Case("csr-key-differs", mismatched, Expect.FAILURE, BAD_MESSAGE_CHECK), ca_certs)

    issuer = client.self_signed_signer(KEYS[2], name("some other CA"))
    not_self_signed = (
        x509.CertificateBuilder()
        .subject_name(name("device-2"))
        .issuer_name(issuer.subject)
        .public_key(KEYS[0].public_key())
        .serial_number(7)
        .not_valid_before(issuer.not_valid_before_utc)
        .not_valid_after(issuer.not_valid_after_utc)
        .sign(KEYS[2], hashes.SHA256())
    )
    csr = client.build_csr(KEYS[0], name("device-2"), challenge=ca.challenge)
    foreign = corpus.signed_with(KEYS[0], not_self_signed, corpus.sealed(csr, ra, corpus.ra_id(ra)))
    check(
        http, Case("signer-not-self-signed", foreign, Expect.FAILURE, BAD_MESSAGE_CHECK), ca_certs
    )

    result = open_cert_rep(post(http, device.der).content, device, ca_certs)
    assert result.pki_status == "0" and len(result.certificates) == 1


def test_replay_gets_the_same_certificate(
    http: httpx.Client, ca: SoftCa, ca_certs: list[x509.Certificate], catch_all: CatchAll
) -> None:
    """A replayed PKCSReq (same transactionID) is answered with the certificate already
    issued for it (RFC 8894 §3.3.1.1), never a second one."""
    request = valid(ca, ca_certs, "replayed", k=2)
    first = open_cert_rep(post(http, request.der).content, request, ca_certs)
    again = open_cert_rep(post(http, request.der).content, request, ca_certs)
    assert first.pki_status == again.pki_status == "0"
    assert first.certificates[0].serial_number == again.certificates[0].serial_number


def test_the_catch_all_is_detected(tmp_path: Path) -> None:
    """The detector itself: a record on the refusal logger is what the fixture fails on."""
    handler = CatchAll()
    logger = logging.getLogger("hsmscep.service.refusal")
    logger.addHandler(handler)
    try:
        from hsmscep.service.refusal import rejection

        assert rejection(RuntimeError("bug"), "t").reason == "internal error"
    finally:
        logger.removeHandler(handler)
    assert len(handler.records) == 1


@pytest.mark.hsm
def test_a_slice_against_the_real_server(server: Server, dev_ca: DevCa) -> None:
    """A sample of the corpus over real uvicorn and SoftHSM2: the same answers, and the
    server's log never shows the catch-all."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        certs = parse_ca_certs(http.get("/scep?operation=GetCACert").content)
        ra, signer = certs[1], client.self_signed_signer(KEYS[0], name("slice"))
        der = client.build_pkcs_req(
            key=KEYS[0], ca_certs=certs, challenge=dev_ca.challenge, subject=name("slice")
        ).der
        cases = list(corpus.structural(der))[::8] + list(corpus.nesting())
        csr = client.build_csr(KEYS[0], name("slice"), challenge=dev_ca.challenge)
        for label, issuer in corpus.BROKEN_ISSUERS.items():
            envelope = corpus.sealed(csr, ra, asn1.seq(issuer, asn1.integer(ra.serial_number)))
            body = corpus.signed_with(KEYS[0], signer, envelope)
            cases.append(Case(f"recipient-{label}", body, Expect.FAILURE, BAD_MESSAGE_CHECK))
        resigned = corpus.signed_with(
            KEYS[1], signer_of(KEYS[1]), corpus.sealed(csr, ra, corpus.ra_id(ra))
        )
        cases.append(Case("re-signed", resigned, Expect.FAILURE, BAD_MESSAGE_CHECK))
        for case in cases:
            check(http, case, certs)
    assert "unexpected error" not in server.output()
    assert "Traceback" not in server.output()


def signer_of(k: rsa.RSAPrivateKey) -> x509.Certificate:
    return client.self_signed_signer(k, name("third party"))
