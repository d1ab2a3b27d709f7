"""The HTTP edge: operations, paths, methods, encodings, limits and framing.

What the app decides (operations, paths, methods, base64 forms, DER limits) runs in process
over ASGI with software keys, each request target checked to reach the app byte for byte.
What the HTTP server decides (chunking, HTTP/1.0, lying Content-Length, Expect, head limits,
floods) runs against a live `hsmscep serve`: http.client or a bare socket on 127.0.0.1.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.config.sections import ALL_CAPS
from hsmscep.config.settings import load_settings
from hsmscep.protocol import asn1
from hsmscep.testing.client import ClientRequest, parse_ca_certs
from tests.conftest import DevCa, Server
from tests.inprocess import SoftCa, serve, soft_ca
from tests.test_enroll import (
    PKI_MESSAGE,
    TIMEOUT,
    fetch_ca_certs,
    issued_cert,
    new_request,
    row_count,
    spki,
)

CUSTOM_CAPS = ("POSTPKIOperation", "SHA-256", "AES", "SCEPStandard")
BIG_BODY = 1024 * 1024


@pytest.fixture(scope="module")
def server_certs(server: Server) -> list[x509.Certificate]:
    return fetch_ca_certs(server.url)


@pytest.fixture(scope="module")
def hca(tmp_path_factory: pytest.TempPathFactory) -> SoftCa:
    return soft_ca(tmp_path_factory.mktemp("http"), "http-ca")


@pytest.fixture(scope="module")
def app(hca: SoftCa) -> Iterator[httpx.Client]:
    with serve(hca) as http:
        yield http


@pytest.fixture(scope="module")
def custom_app(hca: SoftCa) -> Iterator[httpx.Client]:
    """A second app on the same CA with other capabilities and a 1 MiB body cap."""
    env = {"HSMSCEP_SERVER_CAPS": ",".join(CUSTOM_CAPS), "HSMSCEP_SERVER_MAX_BODY": str(BIG_BODY)}
    with serve(hca, load_settings(hca.config, env)) as http:
        yield http


@pytest.fixture(scope="module")
def ca_certs(app: httpx.Client) -> list[x509.Certificate]:
    response = app.get("/scep", params={"operation": "GetCACert"})
    assert response.status_code == 200, response.text
    return parse_ca_certs(response.content)


def stored_count(ca: SoftCa) -> int:
    with closing(sqlite3.connect(ca.db_path)) as db:
        return int(db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0])


def stored_rows(ca: SoftCa, transaction_id: str) -> list[tuple[Any, ...]]:
    """(serial, subject, transaction_id, der, sans_json) rows stored for a transactionID."""
    with closing(sqlite3.connect(ca.db_path)) as db:
        query = (
            "SELECT serial, subject, transaction_id, der, sans_json FROM certificates"
            " WHERE transaction_id = ?"
        )
        return list(db.execute(query, (transaction_id,)).fetchall())


@dataclass(frozen=True)
class Reply:
    """A raw HTTP response; header names in lower case."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def raw_request(
    url: str | httpx.Client,
    method: str,
    target: str,
    body: bytes | Iterator[bytes] | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    chunked: bool = False,
) -> Reply:
    """One request, its target exactly as given: over http.client to a live server's URL,
    or over ASGI to an app's client."""
    if isinstance(url, httpx.Client):
        assert not chunked and not isinstance(body, Iterator)
        request = url.build_request(method, target, content=body, headers=headers)
        assert request.url.raw_path == target.encode(), (request.url.raw_path[:100], target[:100])
        response = url.send(request)
        headers = {k.lower(): v for k, v in response.headers.items()}
        return Reply(response.status_code, headers, response.content)
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
    try:
        conn.request(method, target, body=body, headers=dict(headers or {}), encode_chunked=chunked)
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT)


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (bounded by TIMEOUT and a chunk count)."""
    received = bytearray()
    for _ in range(10_000):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return bytes(received)


def parse_reply(data: bytes) -> Reply:
    """A raw HTTP/1.1 response (Content-Length framed, as uvicorn sends them)."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return Reply(int(status_line.split(" ")[1]), headers, body)


def raw_exchange(url: str, data: bytes, *, half_close: bool = True) -> bytes:
    """Send bytes on a fresh socket and read until the server closes."""
    with connect(url) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_to_close(sock)


def assert_short_plain_error(reply: Reply, statuses: tuple[int, ...] = (400,)) -> None:
    """A 4xx (or 501) with a short plain-text reason and no internals."""
    assert reply.status in statuses, (reply.status, reply.body[:200])
    assert reply.content_type.startswith("text/plain")
    assert 0 < len(reply.body) < 200
    for leak in (b"Traceback", b'File "', b"Error(", b"hsmscep/"):
        assert leak not in reply.body


def expect_success(
    reply: Reply, request: ClientRequest, ca_certs: list[x509.Certificate]
) -> x509.Certificate:
    response = httpx.Response(reply.status, headers=dict(reply.headers), content=reply.body)
    cert = issued_cert(response, request, ca_certs)
    assert spki(cert.public_key()) == spki(request.key.public_key())
    return cert


# ---- GetCACaps / GetCACert ----------------------------------------------------------------


def test_get_ca_caps_lists_the_default_capabilities(app: httpx.Client) -> None:
    """GetCACaps: text/plain, one capability per line, the default set."""
    reply = raw_request(app, "GET", "/scep?operation=GetCACaps")
    assert reply.status == 200
    assert reply.content_type.startswith("text/plain")
    caps = reply.body.decode("ascii").split()
    assert set(caps) == set(ALL_CAPS) and len(caps) == len(ALL_CAPS)
    # What iOS needs to see before it enrolls (interop-quirks #5).
    assert {"POSTPKIOperation", "SHA-1", "SHA-256", "SHA-512", "AES", "DES3"} <= set(caps)


def test_get_ca_caps_is_configurable(custom_app: httpx.Client) -> None:
    """HSMSCEP_SERVER_CAPS replaces the advertised set exactly."""
    reply = raw_request(custom_app, "GET", "/scep?operation=GetCACaps")
    assert reply.status == 200
    assert reply.content_type.startswith("text/plain")
    assert sorted(reply.body.decode("ascii").split()) == sorted(CUSTOM_CAPS)
    assert b"DES3" not in reply.body and b"SHA-1\n" not in reply.body


def test_get_ca_cert_returns_ca_and_ra(app: httpx.Client, hca: SoftCa) -> None:
    """x-x509-ca-ra-cert with the CA first and an RA that can sign and be encrypted to."""
    reply = raw_request(app, "GET", "/scep?operation=GetCACert&message=CAIdentifier")
    assert reply.status == 200
    assert reply.content_type == "application/x-x509-ca-ra-cert"
    certs = parse_ca_certs(reply.body)
    ca = x509.load_pem_x509_certificate(hca.ca_cert.read_bytes())
    ra = x509.load_pem_x509_certificate(hca.ra_cert.read_bytes())
    assert certs == [ca, ra]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not ra.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ra.verify_directly_issued_by(ca)
    ku = ra.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment  # Apple: interop-quirks #3


@pytest.mark.parametrize(
    "message",
    [
        None,
        "CAIdentifier",
        "default",
        "",
        "hsmscep%20CA",
        "%C3%A9t%C3%A9-%E2%9C%93",
        "Apple+Instance+Name",
        "%FF%FE%00",
        "x" * 2000,
    ],
    ids=["absent", "caidentifier", "default", "empty", "text", "unicode", "plus", "bytes", "long"],
)
def test_get_ca_cert_accepts_any_message(app: httpx.Client, message: str | None) -> None:
    """Any message= value, or none, gets the same GetCACert body (interop-quirks #2)."""
    baseline = raw_request(app, "GET", "/scep?operation=GetCACert")
    target = "/scep?operation=GetCACert" + ("" if message is None else f"&message={message}")
    reply = raw_request(app, "GET", target)
    assert reply.status == 200
    assert reply.content_type == "application/x-x509-ca-ra-cert"
    assert reply.body == baseline.body
    assert len(parse_ca_certs(reply.body)) == 2


@pytest.mark.parametrize(
    "path",
    [
        "/scep",
        "/scep/",
        "/scep/pkiclient.exe",
        "/scep/some-instance/pkiclient.exe",
        "/cgi-bin/pkiclient.exe",
    ],
)
def test_path_suffixes_work_for_every_operation(
    app: httpx.Client, hca: SoftCa, ca_certs: list[x509.Certificate], path: str
) -> None:
    """Path suffixes clients append (interop-quirks #2) work for all three operations."""
    caps = raw_request(app, "GET", f"{path}?operation=GetCACaps")
    assert caps.status == 200 and b"POSTPKIOperation" in caps.body
    cert = raw_request(app, "GET", f"{path}?operation=GetCACert&message=default")
    assert cert.status == 200
    assert parse_ca_certs(cert.body) == ca_certs
    request = new_request(ca_certs, hca.challenge, cn=f"path{path.replace('/', '-')}")
    reply = raw_request(
        app,
        "POST",
        f"{path}?operation=PKIOperation",
        request.der,
        {"Content-Type": PKI_MESSAGE},
    )
    expect_success(reply, request, ca_certs)


# ---- PKIOperation over GET: base64 variants (interop-quirks #1) ---------------------------


def _lines(text: str, width: int = 64) -> str:
    return "".join(text[i : i + width] + "\n" for i in range(0, len(text), width))


def encode_message(variant: str, der: bytes) -> str:
    """The message= value as a given kind of client puts it on the wire."""
    std = base64.b64encode(der).decode()
    safe = base64.urlsafe_b64encode(der).decode()
    if variant == "percent-encoded":
        return quote(std, safe="")
    if variant == "raw-plus":
        return std
    if variant == "plus-as-space":
        return std.replace("+", "%20")
    if variant == "only-equals-escaped":
        return std.replace("=", "%3D")
    if variant == "url-safe":
        return safe
    if variant == "url-safe-no-padding":
        return safe.rstrip("=")
    if variant == "line-breaks":
        return quote(_lines(std), safe="")
    if variant == "crlf-line-breaks":
        return quote(_lines(std).replace("\n", "\r\n"), safe="")
    assert variant == "no-padding"
    return quote(std.rstrip("="), safe="")


def _has_feature(variant: str, value: str) -> bool:
    """Does the encoded value really exercise what the variant is named after?"""
    checks = {
        "percent-encoded": "%2B" in value and "%2F" in value and "%3D" in value,
        "raw-plus": "+" in value and "/" in value and value.endswith("="),
        "plus-as-space": "%20" in value and "+" not in value,
        "only-equals-escaped": "+" in value and "/" in value and value.endswith("%3D"),
        "url-safe": "-" in value and "_" in value and "+" not in value and "/" not in value,
        "url-safe-no-padding": "-" in value and "_" in value and "=" not in value,
        "line-breaks": value.count("%0A") > 10 and "%0D" not in value,
        "crlf-line-breaks": value.count("%0D%0A") > 10,
        "no-padding": "=" not in value and "%3D" not in value,
    }
    return checks[variant]


GET_VARIANTS = [
    "percent-encoded",
    "raw-plus",
    "plus-as-space",
    "only-equals-escaped",
    "url-safe",
    "url-safe-no-padding",
    "line-breaks",
    "crlf-line-breaks",
    "no-padding",
]


def _request_with_padding(
    ca_certs: list[x509.Certificate], challenge: str, name: str
) -> ClientRequest:
    # base64 pads unless the length is a multiple of 3. The CSR is padded to the cipher's
    # block size inside the envelope, so a longer CN changes the length only every 16 bytes:
    # try CN lengths across several blocks.
    for extra in range(64):
        request = new_request(ca_certs, challenge, cn=f"get-{name}" + "x" * extra)
        if len(request.der) % 3:
            return request
    raise AssertionError("no request length needing base64 padding")


@pytest.mark.parametrize("variant", GET_VARIANTS)
def test_pki_operation_over_get_accepts_base64_variant(
    app: httpx.Client, hca: SoftCa, ca_certs: list[x509.Certificate], variant: str
) -> None:
    """Every mangled base64 form of a GET message= enrolls and is stored."""
    request = _request_with_padding(ca_certs, hca.challenge, variant)
    value = encode_message(variant, request.der)
    assert _has_feature(variant, value), value[:120]
    reply = raw_request(app, "GET", f"/scep?operation=PKIOperation&message={value}")
    cert = expect_success(reply, request, ca_certs)
    [row] = stored_rows(hca, request.transaction_id)
    assert row[3] == cert.public_bytes(Encoding.DER)


def test_long_get_url_enrolls(
    server: Server, dev_ca: DevCa, server_certs: list[x509.Certificate]
) -> None:
    """A PKCSReq with 60 long DNS SANs: a URL of about 20 KB still works over GET."""
    labels = ".".join(["a" * 60] * 3)  # labels stay within 63 octets, the name within 253
    sans = [x509.DNSName(f"{i:02d}-{labels}.example.com") for i in range(60)]
    request = new_request(server_certs, dev_ca.challenge, cn="long-get", sans=sans)
    target = "/scep?operation=PKIOperation&message=" + encode_message(
        "percent-encoded", request.der
    )
    # The length varies with how many base64 characters need percent-encoding.
    assert len(target) > 16_384
    cert = expect_success(raw_request(server.url, "GET", target), request, server_certs)
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == (
        x509.SubjectAlternativeName(sans)
    )


@pytest.mark.parametrize(
    "query",
    [
        "operation=PKIOperation",
        "operation=PKIOperation&message=",
        "operation=PKIOperation&message=%21%21not-base64%21%21",
        "operation=PKIOperation&message=AAAA&message=AAAA",
        "operation=PKIOperation&message=" + quote(base64.b64encode(b"garbage" * 50).decode()),
    ],
    ids=["no-message", "empty", "not-base64", "two-messages", "garbage"],
)
def test_bad_get_message_is_http_400(app: httpx.Client, hca: SoftCa, query: str) -> None:
    """Missing, empty, duplicated or non-base64 message=: a plain 400."""
    before = stored_count(hca)
    assert_short_plain_error(raw_request(app, "GET", f"/scep?{query}"))
    assert stored_count(hca) == before


@pytest.mark.parametrize("size", [200 * 1024, 4 * 1024 * 1024], ids=["200KiB", "4MiB"])
def test_huge_get_message_is_refused_cleanly(server: Server, dev_ca: DevCa, size: int) -> None:
    """Megabytes of message=: 400/413/414/431, never 2xx or 5xx; the server stays up.

    Past the 192 KiB head limit the answer can be lost to a TCP reset (a race on how much
    of the URL was sent): that bug is pinned down by test_header_flood_gets_an_answer.
    """
    before = row_count(dev_ca)
    target = "/scep?operation=PKIOperation&message=" + "QUFB" * (size // 4)
    try:
        reply: Reply | None = raw_request(server.url, "GET", target)
    except (ConnectionResetError, BrokenPipeError):
        reply = None
    if reply is not None or size <= 200 * 1024:
        assert reply is not None
        assert_short_plain_error(reply, (400, 413, 414, 431))
    assert row_count(dev_ca) == before
    assert raw_request(server.url, "GET", "/healthz").status == 200


# ---- operations and methods ---------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?",
        "?operation=",
        "?message=CAIdentifier",
        "?operation=GetCACaps&operation=GetCACaps",
        "?operation=GetCACaps&operation=GetCACert",
        "?operation=Bogus",
        "?operation=GetCRL",
        "?operation=%00%FF%FE",
        "?operation=" + "A" * 5000,
        "?operation=GetCACaps%00",
    ],
    ids=[
        "none",
        "bare",
        "empty",
        "missing",
        "twice",
        "two-different",
        "unknown",
        "unsupported",
        "binary",
        "long",
        "nul-suffix",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_bad_operation_is_a_short_plain_error(app: httpx.Client, query: str, method: str) -> None:
    """Missing, empty, duplicated or unknown operation=: a short plain 400/501."""
    body = b"" if method == "POST" else None
    reply = raw_request(app, method, f"/scep{query}", body)
    assert_short_plain_error(reply, (400, 501))


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(app: httpx.Client, method: str) -> None:
    """PUT, DELETE and PATCH: 405 with an Allow header."""
    reply = raw_request(app, method, "/scep?operation=GetCACaps", b"x")
    assert_short_plain_error(reply, (405,))
    assert {m.strip() for m in reply.headers["allow"].split(",")} >= {"GET", "POST"}


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-pki-message",
        "application/octet-stream",
        "application/pkcs7",
        "application/pkcs7-mime",
        "application/x-www-form-urlencoded",
        None,
    ],
)
def test_post_content_type_is_ignored(
    app: httpx.Client, hca: SoftCa, ca_certs: list[x509.Certificate], content_type: str | None
) -> None:
    """Whatever Content-Type a client sends, or none, a POST enrolls (interop-quirks #14)."""
    request = new_request(ca_certs, hca.challenge, cn=f"ctype-{content_type}")
    headers = {} if content_type is None else {"Content-Type": content_type}
    reply = raw_request(app, "POST", "/scep?operation=PKIOperation", request.der, headers)
    expect_success(reply, request, ca_certs)


def test_chunked_post_enrolls(
    server: Server, dev_ca: DevCa, server_certs: list[x509.Certificate]
) -> None:
    """A chunked POST body without Content-Length (interop-quirks #14)."""
    request = new_request(server_certs, dev_ca.challenge, cn="chunked")
    pieces = iter([request.der[i : i + 700] for i in range(0, len(request.der), 700)])
    reply = raw_request(
        server.url, "POST", "/scep?operation=PKIOperation", pieces, {}, chunked=True
    )
    expect_success(reply, request, server_certs)


def test_http10_without_host(server: Server) -> None:
    """HTTP/1.0 without a Host header is answered (interop-quirks #14)."""
    data = raw_exchange(server.url, b"GET /scep?operation=GetCACaps HTTP/1.0\r\n\r\n")
    reply = parse_reply(data)
    assert reply.status == 200
    assert b"POSTPKIOperation" in reply.body


# ---- hostile bodies and framing -----------------------------------------------------------


def _definite_nesting(levels: int) -> bytes:
    """`levels` SEQUENCEs each holding the next, with definite lengths, built in O(n)."""
    headers: list[bytes] = []
    length = 0
    for _ in range(levels):
        header = b"\x30" + asn1.der_length(length)
        headers.append(header)
        length += len(header)
    return b"".join(reversed(headers))


@pytest.mark.parametrize(
    "body",
    [
        b"\x30\x80" * 30_000,
        b"\x30\x80" * 16_000 + b"\x00\x00" * 16_000,
        _definite_nesting(10_000),
        b"\xa0\x80" * 30_000,
    ],
    ids=["indefinite", "indefinite-terminated", "definite", "context-tags"],
)
def test_deep_nesting_is_http_400(app: httpx.Client, hca: SoftCa, body: bytes) -> None:
    """Tens of thousands of nested headers under the 64 KiB cap: a plain 400."""
    assert len(body) <= 64 * 1024
    before = stored_count(hca)
    reply = raw_request(
        app, "POST", "/scep?operation=PKIOperation", body, {"Content-Type": PKI_MESSAGE}
    )
    assert_short_plain_error(reply)
    assert stored_count(hca) == before


@pytest.mark.parametrize(
    "body",
    [b"\x30\x80" * 200_000, _definite_nesting(100_000)],
    ids=["indefinite-200k", "definite-100k"],
)
def test_very_deep_nesting_is_http_400(custom_app: httpx.Client, body: bytes) -> None:
    """Hundreds of thousands of levels under a 1 MiB cap: a plain 400, not a crash."""
    assert len(body) <= BIG_BODY
    reply = raw_request(
        custom_app,
        "POST",
        "/scep?operation=PKIOperation",
        body,
        {"Content-Type": PKI_MESSAGE},
    )
    assert_short_plain_error(reply)
    assert raw_request(custom_app, "GET", "/healthz").status == 200


def test_deep_nesting_over_get_is_http_400(server: Server) -> None:
    """Deep nesting arriving as a GET message= (a URL of 100 KiB, past httpx's limit): a 400."""
    value = quote(base64.b64encode(b"\x30\x80" * 40_000).decode(), safe="")
    reply = raw_request(server.url, "GET", f"/scep?operation=PKIOperation&message={value}")
    assert_short_plain_error(reply)


def test_lying_content_length_does_not_hurt_the_server(
    server: Server, dev_ca: DevCa, server_certs: list[x509.Certificate]
) -> None:
    """Content-Length 100 but 10 bytes and a close; then a stalled one: the next still works."""
    head = (
        b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-pki-message\r\nContent-Length: 100\r\n\r\n"
    )
    answer = raw_exchange(server.url, head + b"\x30\x80" * 5)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]

    with connect(server.url) as stalled:
        stalled.sendall(head + b"\x30\x80" * 5)  # and then nothing: the request stays open
        request = new_request(server_certs, dev_ca.challenge, cn="after-lying-client")
        reply = raw_request(
            server.url,
            "POST",
            "/scep?operation=PKIOperation",
            request.der,
            {"Content-Type": PKI_MESSAGE},
        )
        expect_success(reply, request, server_certs)
    assert raw_request(server.url, "GET", "/scep?operation=GetCACaps").status == 200


def test_declared_oversized_body_is_413_before_reading(server: Server) -> None:
    """A Content-Length past the cap is refused from the header alone."""
    data = raw_exchange(
        server.url,
        b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: 100000000\r\n\r\n" + b"\x30\x80" * 8,
    )
    assert data.startswith(b"HTTP/1.1 413"), data[:100]


def test_expect_100_continue_post_enrolls(
    server: Server, dev_ca: DevCa, server_certs: list[x509.Certificate]
) -> None:
    """A client that sends Expect: 100-continue and waits for the interim answer."""
    request = new_request(server_certs, dev_ca.challenge, cn="expect-continue")
    head = (
        "POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {PKI_MESSAGE}\r\nContent-Length: {len(request.der)}\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    with connect(server.url) as sock:
        sock.sendall(head)
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100"), interim[:100]
        sock.sendall(request.der)
        data = read_to_close(sock)
    expect_success(parse_reply(data), request, server_certs)


def test_broken_chunked_framing_is_http_400(server: Server) -> None:
    """A chunk size that is not hex: 400, and the server keeps serving."""
    data = raw_exchange(
        server.url,
        b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n0\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 400"), data[:100]
    assert raw_request(server.url, "GET", "/scep?operation=GetCACaps").status == 200


HEAD = b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: 127.0.0.1\r\n"
END = b"Connection: close\r\n\r\n"


@pytest.mark.parametrize(
    "headers",
    [b"X-Big: " + b"a" * (200 * 1024) + b"\r\n", b"X-A: b\r\n" * 30_000],
    ids=["one-200KiB-header", "30k-headers"],
)
def test_oversized_request_head_is_431(server: Server, headers: bytes) -> None:
    """A request head of a few hundred KiB: 431 with a short reason, and the server is fine."""
    reply = parse_reply(raw_exchange(server.url, HEAD + headers + END, half_close=False))
    assert_short_plain_error(reply, (431,))
    assert raw_request(server.url, "GET", "/healthz").status == 200


FLOODS = [b"X-Big: " + b"a" * (1024 * 1024) + b"\r\n", b"X-A: b\r\n" * 100_000]
FLOOD_IDS = ["one-1MiB-header", "100k-headers"]


def _send_flood(url: str, headers: bytes) -> bytes:
    try:
        return raw_exchange(url, HEAD + headers + END, half_close=False)
    except (ConnectionResetError, BrokenPipeError):
        return b""  # cut off while we were still sending


@pytest.mark.parametrize("headers", FLOODS, ids=FLOOD_IDS)
def test_header_flood_is_refused(server: Server, headers: bytes) -> None:
    """Megabytes of request headers are never buffered and served; the server stays up."""
    data = _send_flood(server.url, headers)
    assert not data.startswith(b"HTTP/1.1 2"), data[:100]
    assert raw_request(server.url, "GET", "/healthz").status == 200


@pytest.mark.parametrize("headers", FLOODS, ids=FLOOD_IDS)
def test_header_flood_gets_an_answer(server: Server, headers: bytes) -> None:
    """A header flood is answered with the 431, not cut off by a TCP reset."""
    data = _send_flood(server.url, headers)
    assert data, "connection reset before any answer"
    assert_short_plain_error(parse_reply(data), (431,))


# ---- last: the server survived everything above -------------------------------------------


def test_server_still_healthy(server: Server) -> None:
    """After this module (and test_enroll's), /healthz answers and nothing crashed."""
    assert server.process.poll() is None
    reply = raw_request(server.url, "GET", "/healthz")
    assert reply.status == 200 and json.loads(reply.body)["status"] == "ok"
    assert "Exception in ASGI application" not in server.output()  # no HTTP 500 anywhere
