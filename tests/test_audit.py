"""The audit trail of PKIOperations, in process (real app, SQLite, software keys): serials as
`openssl x509 -serial` prints them, the subject of polls and queries, HTTP-level refusals."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmscep.policy.crl import openssl_serial as format_serial
from hsmscep.testing import client
from tests.conftest import openssl_serial, post_pki_message
from tests.inprocess import SoftCa, serve, soft_ca

HELD = '\n[profiles.held]\napproval = "manual"\nchallenge_file = "challenge"\n'
SUCCESS, PENDING = "0", "3"


@pytest.fixture(scope="module")
def aca(tmp_path_factory: pytest.TempPathFactory) -> SoftCa:
    return soft_ca(tmp_path_factory.mktemp("audit"), "audit-ca", extra_config=HELD)


@pytest.fixture(scope="module")
def http(aca: SoftCa) -> Iterator[httpx.Client]:
    with serve(aca) as bound:
        yield bound


@pytest.fixture(scope="module")
def ca_certs(http: httpx.Client) -> list[x509.Certificate]:
    return client.parse_ca_certs(http.get("/scep", params={"operation": "GetCACert"}).content)


def read(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "hsmscep.audit"]


def test_serial_format_matches_openssl() -> None:
    # Leading zero nibble kept, every byte printed, upper case: as openssl prints.
    assert [format_serial(s) for s in (0, 1, 0xABC, 0x80, 0x1234ABCD)] == [
        "00",
        "01",
        "0ABC",
        "80",
        "1234ABCD",
    ]


def test_lines_carry_openssl_serials_and_subjects(
    aca: SoftCa,
    http: httpx.Client,
    ca_certs: list[x509.Certificate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hsmscep.audit")
    key = rsa.generate_private_key(65537, 2048)
    enroll = client.build_pkcs_req(
        key=key,
        ca_certs=ca_certs,
        challenge=aca.challenge,
        subject=x509.Name.from_rfc4514_string("CN=audited"),
    )
    result = client.open_cert_rep(post_pki_message(http, enroll.der), enroll, ca_certs)
    [cert] = result.certificates
    get_cert = client.build_cert_query(
        key=key, ca_certs=ca_certs, issuer=ca_certs[0], serial=cert.serial_number
    )
    post_pki_message(http, get_cert.der)
    get_crl = client.build_cert_query(
        key=key,
        ca_certs=ca_certs,
        issuer=ca_certs[0],
        serial=cert.serial_number,
        message_type="22",
    )
    post_pki_message(http, get_crl.der)

    by_id = {line["transaction_id"]: line for line in read(caplog)}
    issued = by_id[enroll.transaction_id]
    assert (issued["decision"], issued["subject"]) == ("issued", "CN=audited")
    assert issued["serial"] == openssl_serial(cert)
    assert by_id[get_cert.transaction_id]["subject"] == "CN=audited"
    assert by_id[get_crl.transaction_id]["subject"] == ca_certs[0].subject.rfc4514_string()
    assert by_id[get_crl.transaction_id]["outcome"] == "CRL sent"


def test_cert_poll_names_the_held_subject(
    aca: SoftCa,
    http: httpx.Client,
    ca_certs: list[x509.Certificate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hsmscep.audit")
    key = rsa.generate_private_key(65537, 2048)
    subject = x509.Name.from_rfc4514_string("CN=held for audit")
    held = client.build_pkcs_req(
        key=key, ca_certs=ca_certs, challenge=aca.challenge, subject=subject
    )
    response = http.post("/scep/held?operation=PKIOperation", content=held.der)
    assert client.open_cert_rep(response.content, held, ca_certs).pki_status == PENDING
    poll = client.build_cert_poll(
        key=key,
        ca_certs=ca_certs,
        transaction_id=held.transaction_id,
        subject=subject,
        signer_cert=held.signer_cert,
    )
    reply = client.open_cert_rep(post_pki_message(http, poll.der), poll, ca_certs)
    assert reply.pki_status == PENDING
    polls = [line for line in read(caplog) if line["message_type"] == "20"]
    assert [(p["decision"], p["subject"], p["profile"]) for p in polls] == [
        ("pending", "CN=held for audit", "held")
    ]


@pytest.mark.parametrize(
    ("method", "query", "body"),
    [
        ("POST", "operation=PKIOperation", b"\x30\x03\x02\x01\x05"),  # not a pkiMessage
        ("GET", "operation=PKIOperation&message=%%%", b""),  # not base64
    ],
)
def test_http_refusal_leaves_a_line(
    http: httpx.Client, caplog: pytest.LogCaptureFixture, method: str, query: str, body: bytes
) -> None:
    caplog.set_level(logging.INFO, logger="hsmscep.audit")
    response = http.request(method, f"/scep/held?{query}", content=body or None)
    assert response.status_code == 400
    [line] = read(caplog)
    assert (line["decision"], line["client"], line["profile"]) == ("invalid", "127.0.0.1", "held")
    assert str(line["outcome"]).startswith("HTTP 400: ")
    assert line["transaction_id"] is None and line["subject"] is None


def test_md5_digest_is_refused_at_http_level_with_a_line(
    http: httpx.Client,
    aca: SoftCa,
    ca_certs: list[x509.Certificate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pkiMessage whose signer digest is MD5 never verifies (HTTP 400), and says so."""
    built = client.build_pkcs_req(
        key=rsa.generate_private_key(65537, 2048),
        ca_certs=ca_certs,
        challenge=aca.challenge,
        subject=x509.Name.from_rfc4514_string("CN=md5 device"),
    )
    info = asn1_cms.ContentInfo.load(built.der)
    info["content"]["signer_infos"][0]["digest_algorithm"] = {"algorithm": "md5"}
    caplog.set_level(logging.INFO, logger="hsmscep.audit")
    response = http.post(
        "/scep/held?operation=PKIOperation",
        content=info.dump(force=True),
        headers={"Content-Type": "application/x-pki-message"},
    )
    assert response.status_code == 400
    [line] = read(caplog)
    assert (line["decision"], line["profile"]) == ("invalid", "held")
    assert str(line["outcome"]).startswith("HTTP 400: ")
    assert "1.2.840.113549.2.5" in str(line["outcome"]) or "md5" in str(line["outcome"]).lower()
