"""Webhooks against a real HTTP(S) server on 127.0.0.1; config, answer and signature units."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsmscep.config.webhook import parse_notify, parse_webhook
from hsmscep.errors import ConfigError, WebhookError
from hsmscep.policy.names import UPN_OID
from hsmscep.policy.webhook import (
    MAX_ANSWER_BYTES,
    AuthorizationRequest,
    WebhookConfig,
    clean_text,
    parse_answer,
    signature_headers,
)
from hsmscep.webhook.client import WebhookClient
from tests.conftest import free_port

SECRET = b"test-webhook-secret-0123456789"
CHALLENGE = "challenge-value-never-logged"
BIG = b'{"allow": true, "reason": "' + b"x" * (MAX_ANSWER_BYTES + 1024) + b'"}'
REQUEST = AuthorizationRequest(
    profile="wifi",
    transaction_id="TX-1234",
    subject="CN=laptop,O=Example",
    sans=("DNS:laptop.example.com", "IP:10.0.0.7"),
    key="RSA 2048",
    challenge=CHALLENGE,
    client_ip="192.0.2.10",
    message_type="19",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class HookServer:
    """A webhook receiver whose answer depends on the path; records every request."""

    ANSWERS: dict[str, tuple[int, dict[str, str], bytes]] = {
        "/allow": (200, {}, b'{"allow": true}'),
        "/deny": (200, {}, b'{"allow": false, "reason": "not\\nin MDM\\u001b[31m"}'),
        "/override": (
            200,
            {},
            json.dumps(
                {
                    "allow": True,
                    "reason": "ok",
                    "subject": "CN=laptop-7,O=Example",
                    "sans": ["DNS:laptop-7.corp.example", "IP:10.0.0.8", "UPN:u@corp.example"],
                    "validity_days": 30,
                }
            ).encode(),
        ),
        "/error": (500, {}, b'{"allow": true}'),
        "/text": (200, {"Content-Type": "text/plain"}, b"yes"),
        "/big": (200, {}, BIG),
        "/redirect": (302, {"Location": "/allow"}, b""),
        "/notify": (204, {}, b""),
    }

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.received: queue.Queue[Received] = queue.Queue()
        self.release = threading.Event()  # lets the /slow and /notify-held handlers answer
        self.answered = threading.Event()  # a held handler is answering
        self.streamed = 0  # bytes of the /endless answer the client took
        self.stream_done = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def requests(self) -> list[Received]:
        out = []
        while not self.received.empty():
            out.append(self.received.get_nowait())
        return out

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                server.received.put(
                    Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                try:
                    self._answer()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

            def _answer(self) -> None:
                if self.path in ("/slow", "/notify-held"):
                    server.release.wait(timeout=10)
                    status, headers, body = server.ANSWERS[
                        "/allow" if self.path == "/slow" else "/notify"
                    ]
                    server.answered.set()  # before the client can see the answer
                    self._send(status, headers, body)
                elif self.path == "/endless":
                    # No Content-Length and (almost) no end: only a capped reader stops early.
                    self.send_response(200)
                    self.end_headers()
                    try:
                        self.wfile.write(b'{"allow": true, "reason": "')
                        for _ in range(4096):  # 256 MiB
                            if server.release.is_set():
                                return
                            self.wfile.write(b"x" * 65536)
                            server.streamed += 65536
                    finally:
                        server.stream_done.set()
                elif self.path == "/trickle":
                    # Every byte comes well within a read timeout, the whole answer does not.
                    body = b'{"allow": true}'
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        if server.release.wait(0.2):
                            return
                else:
                    self._send(*server.ANSWERS[self.path])

            def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def hook() -> Iterator[HookServer]:
    server = HookServer()
    yield server
    server.close()


def verified(received: Received) -> dict[str, Any]:
    """The JSON body, after checking the signature headers the way a receiver would."""
    timestamp = received.headers["x-hsmscep-timestamp"]
    signature = received.headers["x-hsmscep-signature"]
    prefix = f"t={timestamp},v1="
    assert signature.startswith(prefix)
    expected = hmac.new(SECRET, f"{timestamp}.".encode() + received.body, hashlib.sha256)
    assert hmac.compare_digest(signature[len(prefix) :], expected.hexdigest())
    assert abs(time.time() - int(timestamp)) < 3600  # Unix seconds, not milliseconds
    assert received.headers["content-type"] == "application/json"
    body = json.loads(received.body)
    assert isinstance(body, dict)
    return body


def config(url: str, **kwargs: Any) -> WebhookConfig:
    return WebhookConfig(url=url, secret=SECRET, **kwargs)


# --- authorization against the live server ---------------------------------------------------


@pytest.mark.anyio
async def test_allow_sends_signed_request_with_all_details(hook: HookServer) -> None:
    async with WebhookClient() as hooks:
        decision = await hooks.authorize(config(hook.url("/allow")), REQUEST)
    assert decision.allowed and decision.reason == "allowed by webhook"
    assert (decision.subject, decision.sans, decision.validity) == (None, None, None)
    [received] = hook.requests()
    assert received.path == "/allow"
    assert verified(received) == {
        "profile": "wifi",
        "transaction_id": "TX-1234",
        "subject": "CN=laptop,O=Example",
        "sans": ["DNS:laptop.example.com", "IP:10.0.0.7"],
        "key": "RSA 2048",
        "challenge": CHALLENGE,
        "client_ip": "192.0.2.10",
        "message_type": "19",
    }


@pytest.mark.anyio
async def test_deny_carries_cleaned_reason(hook: HookServer) -> None:
    async with WebhookClient() as hooks:
        decision = await hooks.authorize(config(hook.url("/deny")), REQUEST)
    assert not decision.allowed
    assert decision.reason == "not in MDM [31m"


@pytest.mark.anyio
async def test_allow_with_overrides(hook: HookServer) -> None:
    async with WebhookClient() as hooks:
        decision = await hooks.authorize(config(hook.url("/override")), REQUEST)
    assert decision.allowed and decision.reason == "ok"
    assert decision.subject == x509.Name.from_rfc4514_string("CN=laptop-7,O=Example")
    assert decision.validity == timedelta(days=30)
    assert decision.sans is not None
    assert decision.sans.get_values_for_type(x509.DNSName) == ["laptop-7.corp.example"]
    assert decision.sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.8")]
    [upn] = decision.sans.get_values_for_type(x509.OtherName)
    assert upn.type_id == UPN_OID and upn.value == b"\x0c\x0eu@corp.example"


@pytest.mark.anyio
@pytest.mark.parametrize(("on_error", "allowed"), [("deny", False), ("allow", True)])
async def test_timeout_decides_by_on_error(
    hook: HookServer, on_error: str, allowed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hsmscep.webhook.client")
    async with WebhookClient() as hooks:
        decision = await hooks.authorize(
            config(hook.url("/slow"), timeout=0.3, on_error=on_error), REQUEST
        )
        hook.release.set()
    assert decision.allowed is allowed
    assert decision.reason == "webhook error: timeout"
    [record] = [r for r in caplog.records if r.name == "hsmscep.webhook.client"]
    logged = json.loads(record.getMessage())
    assert logged["error"] == "timeout" and logged["transaction_id"] == "TX-1234"
    assert logged["decision"] == on_error
    assert CHALLENGE not in caplog.text and SECRET.decode() not in caplog.text
    assert "/slow" not in caplog.text  # only the webhook's origin is logged


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/error", "HTTP 500"),
        ("/text", "answer is not JSON"),
        ("/big", f"answer larger than {MAX_ANSWER_BYTES} bytes"),
        ("/redirect", "HTTP 302 (redirects are not followed)"),
    ],
)
async def test_bad_answers_deny(
    hook: HookServer, path: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hsmscep.webhook.client")
    async with WebhookClient() as hooks:
        decision = await hooks.authorize(config(hook.url(path)), REQUEST)
    assert not decision.allowed
    assert decision.reason == f"webhook error: {reason}"
    # The redirect target (/allow) was never asked.
    assert [r.path for r in hook.requests()] == [path]
    assert reason in caplog.text and CHALLENGE not in caplog.text


@pytest.mark.anyio
async def test_endless_answer_is_cut_off(hook: HookServer) -> None:
    async with WebhookClient() as hooks:
        decision = await hooks.authorize(config(hook.url("/endless")), REQUEST)
    assert not decision.allowed
    assert decision.reason == f"webhook error: answer larger than {MAX_ANSWER_BYTES} bytes"
    assert await asyncio.to_thread(hook.stream_done.wait, 10)
    # The client hung up after the cap; only socket buffers took more than that.
    assert hook.streamed < 16 * 2**20


@pytest.mark.anyio
async def test_timeout_bounds_the_whole_exchange(hook: HookServer) -> None:
    async with WebhookClient() as hooks:
        decision = await hooks.authorize(config(hook.url("/trickle"), timeout=0.5), REQUEST)
        hook.release.set()
    assert not decision.allowed and decision.reason == "webhook error: timeout"


@pytest.mark.anyio
async def test_error_allows_with_on_error_allow(hook: HookServer) -> None:
    async with WebhookClient() as hooks:
        decision = await hooks.authorize(config(hook.url("/error"), on_error="allow"), REQUEST)
    assert decision.allowed and decision.reason == "webhook error: HTTP 500"


@pytest.mark.anyio
async def test_connection_refused_denies() -> None:
    async with WebhookClient() as hooks:
        decision = await hooks.authorize(config(f"http://127.0.0.1:{free_port()}/"), REQUEST)
    assert not decision.allowed
    assert decision.reason == "webhook error: connection failed"


@pytest.mark.anyio
async def test_closed_client_refuses_to_authorize(hook: HookServer) -> None:
    hooks = WebhookClient()
    await hooks.aclose()
    with pytest.raises(RuntimeError):
        await hooks.authorize(config(hook.url("/allow")), REQUEST)


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "webhook test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.mark.anyio
async def test_https_trusts_the_configured_ca_file(tmp_path: Path) -> None:
    ca_file, cert_file, key_file = _tls_files(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    server = HookServer(tls)
    try:
        table = {"url": server.url("/allow"), "secret_file": "secret", "ca_file": "ca.pem"}
        (tmp_path / "secret").write_bytes(SECRET + b"\n")
        trusted = parse_webhook(table, "profiles.wifi.webhook", tmp_path, {})
        untrusted = config(server.url("/allow"))
        async with WebhookClient() as hooks:
            allowed = await hooks.authorize(trusted, REQUEST)
            refused = await hooks.authorize(untrusted, REQUEST)
    finally:
        server.close()
    assert allowed.allowed and allowed.reason == "allowed by webhook"
    assert not refused.allowed and refused.reason == "webhook error: connection failed"
    assert len(server.requests()) == 1  # the untrusted attempt never got past the handshake


# --- notifications ------------------------------------------------------------------------------

EVENT = {
    "event": "issued",
    "profile": "wifi",
    "transaction_id": "TX-1234",
    "subject": "CN=laptop,O=Example",
    "serial": "3f2a",
    "outcome": "SUCCESS",
    "time": "2026-03-01T12:30:15+00:00",
}


@pytest.mark.anyio
async def test_notification_is_signed_without_challenge_and_does_not_wait(
    hook: HookServer,
) -> None:
    hooks = WebhookClient()
    hooks.notify(config(hook.url("/notify-held")), EVENT | {"challenge": CHALLENGE})
    # notify() has returned; the notification arrives while the receiver holds its answer.
    received = await asyncio.to_thread(hook.received.get, timeout=10)
    assert not hook.answered.is_set()
    hook.release.set()
    await hooks.aclose(grace=10)
    assert hook.answered.is_set() and hook.requests() == []
    assert verified(received) == EVENT
    assert CHALLENGE.encode() not in received.body


@pytest.mark.anyio
async def test_notifications_beyond_the_bound_are_dropped(
    hook: HookServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hsmscep.webhook.client")
    hooks = WebhookClient(max_in_flight=1)
    held = config(hook.url("/notify-held"))
    hooks.notify(held, EVENT)
    hooks.notify(held, EVENT | {"transaction_id": "TX-dropped"})
    hook.release.set()
    await hooks.aclose(grace=10)
    assert [json.loads(r.body)["transaction_id"] for r in hook.requests()] == ["TX-1234"]
    dropped = [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "hsmscep.webhook.client"
    ]
    assert dropped == [
        {
            "event": "notify_dropped",
            "notification": {
                "event": "issued",
                "profile": "wifi",
                "transaction_id": "TX-dropped",
                "webhook": hook.url(""),
            },
        }
    ]


@pytest.mark.anyio
async def test_notification_failures_are_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="hsmscep.webhook.client")
    hooks = WebhookClient()
    hooks.notify(config(f"http://127.0.0.1:{free_port()}/"), EVENT)
    hooks.notify(config("http://127.0.0.1:1/"), {"event": "denied", "bad": object()})
    await hooks.aclose(grace=10)
    logged = [r for r in caplog.records if r.name == "hsmscep.webhook.client"]
    events = sorted(json.loads(r.getMessage())["event"] for r in logged)
    assert events == ["notify_failed", "notify_unserializable"]
    assert "connection failed" in caplog.text


@pytest.mark.anyio
async def test_notify_after_close_is_dropped(
    hook: HookServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hsmscep.webhook.client")
    hooks = WebhookClient()
    await hooks.aclose()
    hooks.notify(config(hook.url("/notify")), EVENT)
    assert "notify_dropped" in caplog.text
    assert hook.requests() == []


# --- config -------------------------------------------------------------------------------------

WHERE = "profiles.wifi.webhook"


def test_parse_webhook_full_table(tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_bytes(b"  " + SECRET + b"\n")
    ca_file, _, _ = _tls_files(tmp_path)
    table = {
        "url": "https://authz.example.com/scep?x=1",
        "secret_file": "hook.secret",
        "timeout_seconds": 2.5,
        "on_error": "allow",
        "ca_file": "ca.pem",
    }
    parsed = parse_webhook(table, WHERE, tmp_path, {})
    assert parsed == WebhookConfig(
        "https://authz.example.com/scep?x=1", SECRET, 2.5, "allow", ca_file.resolve()
    )
    assert SECRET.decode() not in repr(parsed)


def test_parse_defaults_and_secret_env(tmp_path: Path) -> None:
    table = {"url": "http://127.0.0.1:9000/hook", "secret_env": "HOOK_SECRET"}
    parsed = parse_notify(table, "profiles.wifi.notify", tmp_path, {"HOOK_SECRET": "é" * 8})
    assert parsed == WebhookConfig("http://127.0.0.1:9000/hook", "é".encode() * 8, 5.0, "deny")


def test_request_repr_hides_challenge() -> None:
    assert CHALLENGE not in repr(REQUEST)


URL = "https://authz.example.com/"
GOOD_ENV = {"S": "s" * 16}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"url": URL, "secret": "x" * 32}, f"{WHERE}.secret must not be written in the config"),
        ({"secret_env": "S"}, f"{WHERE}.url is required"),
        ({"url": "ftp://h/", "secret_env": "S"}, f"{WHERE}.url must be an http:// or https://"),
        ({"url": "/relative", "secret_env": "S"}, f"{WHERE}.url must be an http:// or https://"),
        ({"url": "http://u:pw@h/", "secret_env": "S"}, f"{WHERE}.url must not carry a user"),
        ({"url": "http://h:99999/", "secret_env": "S"}, f"{WHERE}.url has an invalid port"),
        ({"url": URL}, f"{WHERE}.secret_env or {WHERE}.secret_file is required"),
        ({"url": URL, "secret_env": "S", "secret_file": "f"}, f"{WHERE}: set only one of"),
        ({"url": URL, "secret_env": "UNSET"}, f"{WHERE}.secret_env: environment variable UNSET"),
        ({"url": URL, "secret_env": 3}, f"{WHERE}.secret_env must be the name"),
        ({"url": URL, "secret_env": "SHORT"}, f"{WHERE}.secret_env: the secret must be at least"),
        ({"url": URL, "secret_file": "missing"}, f"{WHERE}.secret_file: cannot read"),
        ({"url": URL, "secret_file": "short"}, f"{WHERE}.secret_file: the secret must be at least"),
        ({"url": URL, "secret_env": "S", "timeout_seconds": 0}, f"{WHERE}.timeout_seconds must"),
        ({"url": URL, "secret_env": "S", "timeout_seconds": 61}, f"{WHERE}.timeout_seconds must"),
        ({"url": URL, "secret_env": "S", "timeout_seconds": "5"}, f"{WHERE}.timeout_seconds"),
        ({"url": URL, "secret_env": "S", "timeout_seconds": True}, f"{WHERE}.timeout_seconds"),
        ({"url": URL, "secret_env": "S", "on_error": "maybe"}, f"{WHERE}.on_error must be deny"),
        ({"url": URL, "secret_env": "S", "retries": 3}, f"{WHERE}.retries is not a known key"),
        (
            {"url": "http://h/", "secret_env": "S", "ca_file": "short"},
            f"{WHERE}.ca_file applies to https:// URLs only",
        ),
        ({"url": URL, "secret_env": "S", "ca_file": "short"}, f"{WHERE}.ca_file: cannot load CA"),
        ({"url": URL, "secret_env": "S", "ca_file": "missing"}, f"{WHERE}.ca_file: cannot load"),
    ],
)
def test_parse_webhook_errors_name_the_key(
    tmp_path: Path, table: dict[str, Any], message: str
) -> None:
    (tmp_path / "short").write_text("too-short\n")
    with pytest.raises(ConfigError) as info:
        parse_webhook(table, WHERE, tmp_path, GOOD_ENV | {"SHORT": "abc"})
    assert str(info.value).startswith(message)
    assert "x" * 32 not in str(info.value)


def test_parse_webhook_refuses_a_non_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^\[profiles\.wifi\.webhook\] must be a table"):
        parse_webhook("https://x/", WHERE, tmp_path, {})  # type: ignore[arg-type]


def test_parse_notify_has_no_on_error(tmp_path: Path) -> None:
    table = {"url": URL, "secret_env": "S", "on_error": "allow"}
    with pytest.raises(ConfigError, match=r"^profiles\.wifi\.notify\.on_error is not a known key"):
        parse_notify(table, "profiles.wifi.notify", tmp_path, GOOD_ENV)


# --- pure parts --------------------------------------------------------------------------------


def test_signature_headers_known_vector() -> None:
    # printf '1700000000.{"allow":true}' | openssl dgst -sha256 -hmac 'sixteen-byte-key!'
    mac = "34fc1b0231f2d3e5f439977c7add329f9746d4b787cfd151695408e06ed887b3"
    assert signature_headers(b"sixteen-byte-key!", b'{"allow":true}', 1700000000) == {
        "X-Hsmscep-Timestamp": "1700000000",
        "X-Hsmscep-Signature": f"t=1700000000,v1={mac}",
    }


def test_request_json_is_stable_utf8() -> None:
    request = AuthorizationRequest(
        profile="p",
        transaction_id="t",
        subject="CN=Zoë",
        sans=(),
        key="EC P-256",
        challenge=None,
        client_ip="::1",
        message_type="17",
    )
    assert (
        request.to_json()
        == (
            '{"challenge":null,"client_ip":"::1","key":"EC P-256","message_type":"17",'
            '"profile":"p","sans":[],"subject":"CN=Zoë","transaction_id":"t"}'
        ).encode()
    )


def test_parse_answer_valid_forms() -> None:
    assert parse_answer(200, b'{"allow": true}').reason == "allowed by webhook"
    denied = parse_answer(201, b'{"allow": false, "reason": null}')
    assert not denied.allowed and denied.reason == "denied by webhook"
    nulls = parse_answer(200, b'{"allow": false, "sans": null, "validity_days": null}')
    assert not nulls.allowed
    answer = {
        "allow": True,
        "sans": ["dns:a.example", "IP:2001:db8::1", "email:x@y.example", "URI:urn:a:b"],
        "validity_days": 1,
    }
    decision = parse_answer(200, json.dumps(answer).encode())
    assert decision.sans == x509.SubjectAlternativeName(
        [
            x509.DNSName("a.example"),
            x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
            x509.RFC822Name("x@y.example"),
            x509.UniformResourceIdentifier("urn:a:b"),
        ]
    )
    assert decision.validity == timedelta(days=1)


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (403, b'{"allow": false}', "HTTP 403"),
        (301, b"", "HTTP 301 (redirects are not followed)"),
        (200, b"", "answer is not JSON"),
        (200, b"\xff{}", "answer is not JSON"),
        (200, b"[" * 100000, "answer larger than"),
        (200, b"[" * 30000 + b"]" * 30000, "answer is not JSON"),
        (200, b'["allow"]', "answer is not a JSON object"),
        (200, b"{}", '"allow" must be true or false'),
        (200, b'{"allow": "yes"}', '"allow" must be true or false'),
        (200, b'{"allow": true, "validity": 30}', "unknown key 'validity'"),
        (200, b'{"allow": true, "reason": 5}', '"reason" must be a string'),
        (200, b'{"allow": false, "validity_days": 3}', "a denial cannot carry overrides"),
        (200, b'{"allow": true, "validity_days": 0}', '"validity_days" must be from 1'),
        (200, b'{"allow": true, "validity_days": 36501}', '"validity_days" must be from 1'),
        (200, b'{"allow": true, "validity_days": 30.0}', '"validity_days" must be an integer'),
        (200, b'{"allow": true, "validity_days": true}', '"validity_days" must be an integer'),
        (200, b'{"allow": true, "sans": []}', '"sans" must be a list of 1 to 64'),
        (200, b'{"allow": true, "sans": "DNS:a"}', '"sans" must be a list'),
        (200, b'{"allow": true, "sans": ["a.example"]}', 'every entry of "sans" must be'),
        (200, b'{"allow": true, "sans": [7]}', 'every entry of "sans" must be'),
        (200, b'{"allow": true, "sans": ["RID:1.2.3"]}', "unknown SAN type 'rid'"),
        (200, b'{"allow": true, "sans": ["DNS:"]}', "invalid DNS SAN"),
        (200, '{"allow": true, "sans": ["DNS:bü.de"]}'.encode(), "invalid DNS SAN"),
        (200, b'{"allow": true, "sans": ["DNS:a b"]}', "invalid DNS SAN"),
        (200, b'{"allow": true, "sans": ["IP:10.0.0.300"]}', "invalid IP SAN"),
        (200, b'{"allow": true, "sans": ["UPN:a\\nb"]}', "invalid UPN SAN"),
        (200, b'{"allow": true, "subject": ""}', '"subject" must be a non-empty'),
        (200, b'{"allow": true, "subject": "FOO=bar"}', '"subject" is not a valid RFC 4514'),
    ],
)
def test_parse_answer_errors(status: int, body: bytes, message: str) -> None:
    with pytest.raises(WebhookError) as info:
        parse_answer(status, body)
    assert str(info.value).startswith(message)


def test_parse_answer_too_many_sans() -> None:
    body = json.dumps({"allow": True, "sans": [f"DNS:h{i}.example" for i in range(65)]})
    with pytest.raises(WebhookError, match="must be a list of 1 to 64"):
        parse_answer(200, body.encode())


def test_clean_text_removes_controls_and_truncates() -> None:
    assert clean_text("a\r\nb\x00c\u202ed\u2028e\tf  g") == "a b c d e f g"
    assert clean_text("y" * 10000) == "y" * 200
    with pytest.raises(WebhookError) as info:
        parse_answer(200, b'{"allow": true, "evil\\nkey": 1}')
    assert str(info.value) == "unknown key 'evil key' in the answer"


@pytest.mark.anyio
async def test_authorization_calls_are_observed_for_the_metrics(hook: HookServer) -> None:
    seen: list[tuple[str, float]] = []
    async with WebhookClient(
        observe=lambda result, seconds: seen.append((result, seconds))
    ) as hooks:
        for path in ("/allow", "/deny", "/error"):
            await hooks.authorize(config(hook.url(path)), REQUEST)
        await hooks.authorize(config(hook.url("/slow"), timeout=0.3), REQUEST)
        hook.release.set()
    assert [result for result, _ in seen] == ["allowed", "denied", "error", "timeout"]
    assert all(seconds >= 0 for _, seconds in seen) and seen[-1][1] >= 0.3
