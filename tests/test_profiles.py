"""Enrollment profiles: several endpoints on one app, in process (software keys, SQLite).

Profiles with different templates, challenge policies (static, one-time, webhook, none), the
Microsoft template name choosing a profile, the admin API and CLI for one-time challenges, a
real local HTTP server as the authorization and notification webhook, and config errors. One
scepclient enrollment still runs against a real `hsmscep serve` on SoftHSM2.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsmscep.config.settings import load_settings
from hsmscep.errors import ConfigError
from hsmscep.policy.challenges import challenge_hash
from hsmscep.store.records import OneTimeChallenge
from hsmscep.store.sqlite import CertStore
from hsmscep.testing import client
from tests.conftest import DevCa, Server, free_port, make_ca, openssl_serial, start_server
from tests.inprocess import SoftCa, add_ca, serve, soft_ca

SUCCESS, FAILURE = "0", "2"
BAD_REQUEST = "2"
TIMEOUT = 60.0
ADMIN_TOKEN = "profiles-admin-token-0123456789"
WIFI_CHALLENGE = "wifi-static-secret"
HOOK_SECRET = b"hook-shared-secret-0123456789"

PROFILES = """
[admin]
token_file = "admin-token"

[profiles.wifi]
challenge_file = "wifi-challenge"
caps = ["POSTPKIOperation", "SHA-256", "AES"]

[profiles.wifi.template]
validity_days = 30
extended_key_usage = ["clientAuth", "serverAuth"]
san_types = ["dns"]
san_patterns = {{ dns = '[a-z0-9-]+\\.wifi\\.example' }}
max_sans = 2
san_required = true
subject_forbidden = ["OU"]

[profiles.router]
challenge_mode = "one_time"
ms_template = "RouterCert"

[profiles.router.template]
min_rsa_bits = 3072
subject_mode = "rewrite"
subject_pattern = "CN={{CN}},O=Routers Inc"
key_usage = ["digitalSignature"]
signature_hash = "sha384"

[profiles.otp]
challenge_mode = "one_time"
challenge_ttl_seconds = 600

[profiles.hook]
challenge_mode = "webhook"

[profiles.hook.webhook]
url = "http://127.0.0.1:{port}/authorize"
secret_file = "hook-secret"
timeout_seconds = 1

[profiles.hook.notify]
url = "http://127.0.0.1:{port}/notify"
secret_file = "hook-secret"

[profiles.open]
challenge_mode = "none"

[profiles.held]
challenge_file = "wifi-challenge"
approval = "manual"
pending_ttl_hours = 5

[profiles.held.template]
validity_days = 10
extended_key_usage = ["serverAuth"]

[profiles.netgear]
ca = "routers"
challenge_mode = "one_time"

[cas.routers]
key_label = "routers-ca"
ra_key_label = "routers-ra"

[crl]
base_url = "http://pki.example"
"""


# ---- the webhook: a real HTTP server on 127.0.0.1 -------------------------------------------


class Webhook:
    """Answers /authorize by the requested CN's prefix and records what it received."""

    def __init__(self) -> None:
        self.authorizations: list[dict[str, Any]] = []
        self.notifications: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                timestamp = self.headers["X-Hsmscep-Timestamp"]
                expected = hmac.new(
                    HOOK_SECRET, f"{timestamp}.".encode() + body, hashlib.sha256
                ).hexdigest()
                signature = self.headers["X-Hsmscep-Signature"]
                document = json.loads(body)
                with hook.lock:
                    if signature != f"t={timestamp},v1={expected}":
                        hook.bad_signatures += 1
                    if self.path == "/notify":
                        hook.notifications.append(document)
                    else:
                        hook.authorizations.append(document)
                if self.path == "/notify":
                    self._answer({"ok": True})
                    return
                cn = document["subject"].split(",")[0].removeprefix("CN=")
                if cn.startswith("slow"):
                    time.sleep(3)  # beyond the profile's 1 s timeout
                    self._answer({"allow": True})
                elif cn.startswith("deny"):
                    self._answer({"allow": False, "reason": "device not in inventory"})
                elif cn.startswith("override"):
                    self._answer(
                        {
                            "allow": True,
                            "sans": ["DNS:override.hook.example"],
                            "validity_days": 7,
                            "subject": "CN=overridden,O=Hook Inc",
                        }
                    )
                else:
                    self._answer({"allow": True})

            def _answer(self, document: dict[str, Any]) -> None:
                payload = json.dumps(document).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the server gave up waiting (the timeout case)
                    pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def write_secrets(directory: Path) -> None:
    (directory / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (directory / "wifi-challenge").write_text(WIFI_CHALLENGE + "\n")
    (directory / "hook-secret").write_bytes(HOOK_SECRET + b"\n")


@pytest.fixture(scope="module")
def pca(tmp_path_factory: pytest.TempPathFactory, webhook: Webhook) -> SoftCa:
    directory = tmp_path_factory.mktemp("profiles")
    write_secrets(directory)
    extra = PROFILES.format(port=webhook.port)
    ca = soft_ca(directory, "profiles-ca", extra_config=extra)
    add_ca(ca, "routers", "CN=routers CA")
    return ca


@pytest.fixture(scope="module")
def pserver(pca: SoftCa) -> Iterator[httpx.Client]:
    with serve(pca) as http:
        yield http


@pytest.fixture(autouse=True)
def nothing_secret_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    yield
    assert "Traceback" not in caplog.text
    # No challenge value, shared secret or admin token is ever logged.
    for secret in ("secret-profiles-ca", WIFI_CHALLENGE, HOOK_SECRET.decode(), ADMIN_TOKEN):
        assert secret not in caplog.text


@pytest.fixture(scope="module")
def ca_certs(pserver: httpx.Client) -> list[x509.Certificate]:
    response = pserver.get("/scep", params={"operation": "GetCACert"})
    return client.parse_ca_certs(response.content)


# ---- helpers --------------------------------------------------------------------------------


@cache
def rsa_key(index: int, bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def name(text: str) -> x509.Name:
    return x509.Name.from_rfc4514_string(text)


def request_for(
    ca_certs: Sequence[x509.Certificate],
    challenge: str | None,
    subject: str,
    *,
    sans: Sequence[x509.GeneralName] = (),
    key: rsa.RSAPrivateKey | None = None,
    template_name: str | None = None,
) -> client.ClientRequest:
    return client.build_pkcs_req(
        key=key or rsa_key(0),
        ca_certs=ca_certs,
        challenge=challenge,
        subject=name(subject),
        sans=sans,
        template_name=template_name,
    )


def send(
    http: httpx.Client,
    path: str,
    request: client.ClientRequest,
    ca_certs: Sequence[x509.Certificate],
) -> client.CertRepResult:
    """POST the request to `path` of the app (or a live server's URL + path)."""
    response = http.post(
        f"{path}?operation=PKIOperation",
        content=request.der,
        headers={"Content-Type": "application/x-pki-message"},
    )
    assert response.status_code == 200, response.text
    return client.open_cert_rep(response.content, request, ca_certs)


def certificate(
    result: client.CertRepResult, ca_certs: Sequence[x509.Certificate]
) -> x509.Certificate:
    assert (result.pki_status, result.fail_info) == (SUCCESS, None)
    [cert] = result.certificates
    cert.verify_directly_issued_by(ca_certs[0])
    return cert


def refused(result: client.CertRepResult) -> None:
    assert (result.pki_status, result.fail_info) == (FAILURE, BAD_REQUEST)
    assert result.certificates == []


def stored(ca: SoftCa) -> int:
    with sqlite3.connect(ca.db_path) as db:
        return int(db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0])


def validity(cert: x509.Certificate) -> timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def sans_of(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def admin_challenge(
    http: httpx.Client, body: dict[str, Any], token: str = ADMIN_TOKEN
) -> httpx.Response:
    return http.post("/admin/challenges", json=body, headers={"Authorization": f"Bearer {token}"})


def new_challenge(http: httpx.Client, profile: str, **extra: Any) -> str:
    response = admin_challenge(http, {"profile": profile, **extra})
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    value = response.json()["challenge"]
    assert isinstance(value, str) and len(value) >= 32
    return value


def spki(key: Any) -> bytes:
    return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


# ---- templates: two profiles, two kinds of certificate --------------------------------------


def test_profiles_issue_certificates_by_their_templates(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    san = [x509.DNSName("ap-1.wifi.example")]
    default = certificate(
        send(
            pserver, "/scep", request_for(ca_certs, pca.challenge, "CN=laptop", sans=san), ca_certs
        ),
        ca_certs,
    )
    wifi = certificate(
        send(
            pserver,
            "/scep/wifi",
            request_for(ca_certs, WIFI_CHALLENGE, "CN=laptop", sans=san),
            ca_certs,
        ),
        ca_certs,
    )
    assert validity(default) == timedelta(days=365, minutes=5)
    assert validity(wifi) == timedelta(days=30, minutes=5)
    assert eku(default) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert eku(wifi) == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    assert sans_of(default) == sans_of(wifi) == san
    # A path suffix after the profile name is tolerated, as for /scep itself.
    tolerant = send(
        pserver,
        "/scep/wifi/pkiclient.exe",
        request_for(ca_certs, WIFI_CHALLENGE, "CN=suffix", sans=san),
        ca_certs,
    )
    assert validity(certificate(tolerant, ca_certs)) == timedelta(days=30, minutes=5)


def test_each_profile_has_its_own_caps(pserver: httpx.Client) -> None:
    def caps(path: str) -> list[str]:
        response = pserver.get(path, params={"operation": "GetCACaps"})
        assert response.status_code == 200
        return response.text.split()

    assert caps("/scep/wifi") == ["POSTPKIOperation", "SHA-256", "AES"]
    assert "Renewal" in caps("/scep") and "DES3" in caps("/scep")
    assert caps("/scep/router") == caps("/scep")  # inherits server.caps


def test_profile_needs_its_own_static_challenge(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    san = [x509.DNSName("ap-2.wifi.example")]
    before = stored(pca)
    refused(
        send(
            pserver, "/scep/wifi", request_for(ca_certs, pca.challenge, "CN=x", sans=san), ca_certs
        )
    )
    refused(
        send(pserver, "/scep", request_for(ca_certs, WIFI_CHALLENGE, "CN=x", sans=san), ca_certs)
    )
    assert stored(pca) == before


@pytest.mark.parametrize(
    ("subject", "sans"),
    [
        ("CN=ap", [x509.RFC822Name("ap@wifi.example")]),  # SAN type not allowed
        ("CN=ap", [x509.DNSName("ap.evil.example")]),  # SAN pattern
        ("CN=ap", [x509.DNSName(f"ap-{i}.wifi.example") for i in range(3)]),  # max_sans
        ("CN=ap", []),  # san_required
        ("CN=ap,OU=forbidden", [x509.DNSName("ap.wifi.example")]),  # subject_forbidden
    ],
    ids=["san-type", "san-pattern", "max-sans", "san-required", "forbidden-attribute"],
)
def test_template_refusals_store_nothing(
    pca: SoftCa,
    pserver: httpx.Client,
    ca_certs: list[x509.Certificate],
    subject: str,
    sans: list[x509.GeneralName],
) -> None:
    before = stored(pca)
    refused(
        send(
            pserver,
            "/scep/wifi",
            request_for(ca_certs, WIFI_CHALLENGE, subject, sans=sans),
            ca_certs,
        )
    )
    assert stored(pca) == before


# ---- one-time challenges ---------------------------------------------------------------------


def test_one_time_challenge_is_used_once(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    value = new_challenge(pserver, "otp")
    cert = certificate(
        send(pserver, "/scep/otp", request_for(ca_certs, value, "CN=otp-1"), ca_certs), ca_certs
    )
    assert cert.subject == name("CN=otp-1")
    before = stored(pca)
    refused(send(pserver, "/scep/otp", request_for(ca_certs, value, "CN=otp-2"), ca_certs))
    refused(send(pserver, "/scep/otp", request_for(ca_certs, "never-issued", "CN=otp-3"), ca_certs))
    refused(send(pserver, "/scep/otp", request_for(ca_certs, None, "CN=otp-4"), ca_certs))
    # A one-time challenge belongs to its profile: the same value does nothing elsewhere.
    other = new_challenge(pserver, "otp")
    refused(
        send(
            pserver,
            "/scep/router",
            request_for(ca_certs, other, "CN=otp-5", key=rsa_key(1, 3072)),
            ca_certs,
        )
    )
    assert stored(pca) == before


def test_a_resent_request_gets_its_certificate_not_a_refusal(
    pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    value = new_challenge(pserver, "otp")
    request = request_for(ca_certs, value, "CN=otp-resend")
    first = certificate(send(pserver, "/scep/otp", request, ca_certs), ca_certs)
    again = certificate(send(pserver, "/scep/otp", request, ca_certs), ca_certs)
    assert again.serial_number == first.serial_number


def test_fifty_concurrent_requests_one_certificate(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    value = new_challenge(pserver, "otp")
    requests = [request_for(ca_certs, value, f"CN=race-{i}") for i in range(50)]
    before = stored(pca)
    barrier = threading.Barrier(50, timeout=60)

    def attempt(request: client.ClientRequest) -> client.CertRepResult:
        barrier.wait()
        return send(pserver, "/scep/otp", request, ca_certs)

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(attempt, requests))
    winners = [r for r in results if r.pki_status == SUCCESS]
    assert len(winners) == 1
    assert all(
        (r.pki_status, r.fail_info) == (FAILURE, BAD_REQUEST) for r in results if r not in winners
    )
    assert stored(pca) == before + 1


def test_expired_challenge_is_refused(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    value = "expired-challenge-value-0123456789"
    now = datetime.now(UTC)

    async def add() -> None:
        store = await CertStore.open(pca.db_path)
        try:
            await store.add_challenge(
                OneTimeChallenge(
                    hash=challenge_hash(value),
                    created_at=now - timedelta(hours=2),
                    expires_at=now - timedelta(hours=1),
                    profile="otp",
                )
            )
        finally:
            await store.close()

    asyncio.run(add())
    before = stored(pca)
    refused(send(pserver, "/scep/otp", request_for(ca_certs, value, "CN=late"), ca_certs))
    assert stored(pca) == before


def test_challenge_bound_to_a_subject_and_san_pattern(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    value = new_challenge(
        pserver, "otp", subject_pattern="CN=kiosk-[0-9]+", san_pattern=r"DNS:kiosk-[0-9]+\.example"
    )
    before = stored(pca)
    refused(send(pserver, "/scep/otp", request_for(ca_certs, value, "CN=laptop-1"), ca_certs))
    bad_san = [x509.DNSName("laptop.example")]
    refused(
        send(
            pserver, "/scep/otp", request_for(ca_certs, value, "CN=kiosk-1", sans=bad_san), ca_certs
        )
    )
    assert stored(pca) == before
    # The refusals did not use the challenge up.
    good = [x509.DNSName("kiosk-1.example")]
    cert = certificate(
        send(pserver, "/scep/otp", request_for(ca_certs, value, "CN=kiosk-1", sans=good), ca_certs),
        ca_certs,
    )
    assert sans_of(cert) == good


def test_cli_issues_a_working_challenge(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    cli = subprocess.run(
        [sys.executable, "-m", "hsmscep", "challenge", "issue", "--config", str(pca.config)]
        + ["--profile", "otp", "--ttl", "300", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    issued = json.loads(cli.stdout)
    assert issued["profile"] == "otp"
    expires = datetime.fromisoformat(issued["expires_at"]) - datetime.fromisoformat(
        issued["created_at"]
    )
    assert expires == timedelta(seconds=300)
    assert issued["challenge"] not in cli.stderr  # the audit line never carries the value
    cert = certificate(
        send(pserver, "/scep/otp", request_for(ca_certs, issued["challenge"], "CN=cli"), ca_certs),
        ca_certs,
    )
    assert cert.subject == name("CN=cli")
    with sqlite3.connect(pca.db_path) as db:
        values = [row[0] for row in db.execute("SELECT hash FROM challenges")]
    assert issued["challenge"] not in values and challenge_hash(issued["challenge"]) in values


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "nope"], "no enrollment profile 'nope'"),
        (["--profile", "wifi"], "does not use one-time challenges"),
        (["--profile", "otp", "--ttl", "0"], "ttl_seconds must be between"),
        (["--profile", "otp", "--subject-pattern", "("], "subject_pattern is not a valid"),
    ],
)
def test_cli_refuses_bad_challenge_requests(pca: SoftCa, args: list[str], message: str) -> None:
    cli = subprocess.run(
        [sys.executable, "-m", "hsmscep", "challenge", "issue", "--config", str(pca.config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 2 and message in cli.stderr, cli.stderr


def test_admin_challenge_api_refusals(pserver: httpx.Client) -> None:
    assert (
        admin_challenge(pserver, {"profile": "otp"}, token="wrong-token-0123456789").status_code
        == 401
    )
    assert admin_challenge(pserver, {"profile": "nope"}).status_code == 404
    static = admin_challenge(pserver, {"profile": "wifi"})
    assert static.status_code == 400 and "does not use one-time challenges" in static.text
    assert admin_challenge(pserver, {"profile": "otp", "ttl_seconds": "1h"}).status_code == 400
    assert admin_challenge(pserver, {"profile": "otp", "colour": "red"}).status_code == 400
    wrong_method = pserver.get(
        "/admin/challenges", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert wrong_method.status_code == 405


# ---- the Microsoft certificate template name chooses the profile ----------------------------


def test_ms_template_name_selects_the_router_profile(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    key = rsa_key(1, 3072)
    # Sent to the default endpoint, with the default challenge: the router profile decides,
    # and it wants a one-time challenge.
    refused(
        send(
            pserver,
            "/scep",
            request_for(
                ca_certs, pca.challenge, "CN=r1,OU=net", key=key, template_name="RouterCert"
            ),
            ca_certs,
        )
    )
    value = new_challenge(pserver, "router")
    # The router template's key size rule holds; the refusal does not use the challenge up.
    refused(
        send(
            pserver,
            "/scep",
            request_for(ca_certs, value, "CN=r1", template_name="RouterCert"),
            ca_certs,
        )
    )
    cert = certificate(
        send(
            pserver,
            "/scep",
            request_for(ca_certs, value, "CN=r1,OU=net", key=key, template_name="routercert"),
            ca_certs,
        ),
        ca_certs,
    )
    assert cert.subject == name("CN=r1,O=Routers Inc")  # rewritten
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_encipherment
    assert spki(cert.public_key()) == spki(key.public_key())


def test_unknown_template_name_stays_with_the_endpoint(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    cert = certificate(
        send(
            pserver,
            "/scep",
            request_for(ca_certs, pca.challenge, "CN=other", template_name="Machine"),
            ca_certs,
        ),
        ca_certs,
    )
    assert validity(cert) == timedelta(days=365, minutes=5)


# ---- webhook authorization and notifications ------------------------------------------------


def test_webhook_allows_and_sees_the_request(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate], webhook: Webhook
) -> None:
    sans = [x509.DNSName("allow.hook.example")]
    request = request_for(ca_certs, "hook-challenge", "CN=allow-1", sans=sans)
    cert = certificate(send(pserver, "/scep/hook", request, ca_certs), ca_certs)
    assert sans_of(cert) == sans
    [seen] = [a for a in webhook.authorizations if a["transaction_id"] == request.transaction_id]
    assert seen == {
        "challenge": "hook-challenge",
        "client_ip": "127.0.0.1",
        "key": "RSA 2048",
        "message_type": "19",
        "profile": "hook",
        "sans": ["DNS:allow.hook.example"],
        "subject": "CN=allow-1",
        "transaction_id": request.transaction_id,
    }
    assert webhook.bad_signatures == 0


def test_webhook_denies(
    pca: SoftCa,
    pserver: httpx.Client,
    ca_certs: list[x509.Certificate],
    webhook: Webhook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = stored(pca)
    refused(send(pserver, "/scep/hook", request_for(ca_certs, "x", "CN=deny-1"), ca_certs))
    assert stored(pca) == before
    assert "webhook denied: device not in inventory" in caplog.text


def test_webhook_overrides_subject_sans_and_validity(
    pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    request = request_for(ca_certs, "x", "CN=override-1", sans=[x509.DNSName("asked.example")])
    cert = certificate(send(pserver, "/scep/hook", request, ca_certs), ca_certs)
    assert sans_of(cert) == [x509.DNSName("override.hook.example")]
    assert cert.subject == name("CN=overridden,O=Hook Inc")
    assert validity(cert) == timedelta(days=7, minutes=5)


def test_webhook_timeout_denies(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    before = stored(pca)
    refused(send(pserver, "/scep/hook", request_for(ca_certs, "x", "CN=slow-1"), ca_certs))
    assert stored(pca) == before


def test_notifications_on_issue_and_deny(
    pserver: httpx.Client, ca_certs: list[x509.Certificate], webhook: Webhook
) -> None:
    issued = request_for(ca_certs, "notify-secret-challenge", "CN=allow-notify")
    cert = certificate(send(pserver, "/scep/hook", issued, ca_certs), ca_certs)
    denied = request_for(ca_certs, "notify-secret-challenge", "CN=deny-notify")
    refused(send(pserver, "/scep/hook", denied, ca_certs))
    deadline = time.monotonic() + 20

    def events() -> dict[str, dict[str, Any]]:
        with webhook.lock:
            return {
                n["transaction_id"]: n
                for n in webhook.notifications
                if n["transaction_id"] in (issued.transaction_id, denied.transaction_id)
            }

    while len(events()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    seen = events()
    assert seen[issued.transaction_id]["event"] == "issued"
    assert seen[issued.transaction_id]["serial"] == openssl_serial(cert)
    assert seen[denied.transaction_id]["event"] == "denied"
    assert all(n["profile"] == "hook" for n in seen.values())
    assert "notify-secret-challenge" not in json.dumps(list(seen.values()))
    assert webhook.bad_signatures == 0


# ---- challenge_mode none, audit lines --------------------------------------------------------


def test_profile_without_challenge(pserver: httpx.Client, ca_certs: list[x509.Certificate]) -> None:
    cert = certificate(
        send(pserver, "/scep/open", request_for(ca_certs, None, "CN=trusted"), ca_certs), ca_certs
    )
    assert cert.subject == name("CN=trusted")


def test_every_decision_is_a_json_audit_line(
    pca: SoftCa,
    pserver: httpx.Client,
    ca_certs: list[x509.Certificate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ok = request_for(ca_certs, WIFI_CHALLENGE, "CN=audit-ok", sans=[x509.DNSName("a.wifi.example")])
    certificate(send(pserver, "/scep/wifi", ok, ca_certs), ca_certs)
    bad = request_for(
        ca_certs, WIFI_CHALLENGE, "CN=audit-bad", sans=[x509.DNSName("a.evil.example")]
    )
    refused(send(pserver, "/scep/wifi", bad, ca_certs))
    lines = {}
    for line in caplog.text.splitlines():
        start = line.find('{"event": "pki_operation"')
        if start >= 0:
            entry = json.loads(line[start:])
            lines[entry["transaction_id"]] = entry
    good, denied = lines[ok.transaction_id], lines[bad.transaction_id]
    assert (good["profile"], good["decision"], good["subject"]) == ("wifi", "issued", "CN=audit-ok")
    assert (denied["profile"], denied["decision"], denied["subject"]) == (
        "wifi",
        "denied",
        "CN=audit-bad",
    )
    assert denied["outcome"].startswith("BAD_REQUEST: ") and "pattern" in denied["outcome"]


# ---- config errors ---------------------------------------------------------------------------


def write_config(pca: SoftCa, tmp_path: Path, extra: str) -> Path:
    base = pca.config.read_text().split("\n[admin]")[0]
    config = tmp_path / "hsmscep.toml"
    for file in ("pin", "challenge", "wifi-challenge", "hook-secret", "ca.pem", "ra.pem"):
        (tmp_path / file).write_bytes((pca.directory / file).read_bytes())
    config.write_text(base + extra)
    return config


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[profiles.x]\ncolour = 'red'\n", "profiles.x.colour: unknown key (profile 'x')"),
        ("[profiles.x]\nchallenge_mode = 'magic'\n", "profiles.x.challenge_mode must be one of"),
        ("[profiles.x]\n", "profiles.x: no challenge configured"),
        ("[profiles.x]\nchallenge_mode = 'webhook'\n", "needs a [profiles.x.webhook] table"),
        (
            "[profiles.x]\nchallenge_mode = 'none'\n[profiles.x.template]\nmax_sans = 'many'\n",
            "profiles.x.template.max_sans",
        ),
        (
            "[profiles.x]\nchallenge_mode = 'none'\n[profiles.x.template]\n"
            "san_patterns = {dns = '('}\n",
            "profiles.x.template.san_patterns",
        ),
        (
            "[profiles.x]\nchallenge_mode = 'none'\nms_template = 'T'\n"
            "[profiles.y]\nchallenge_mode = 'none'\nms_template = 't'\n",
            "both claim the certificate template",
        ),
        ("[profiles.'bad/name']\nchallenge_mode = 'none'\n", "profiles.bad/name: a name is 1-64"),
        ("[profiles.default]\nchallenge_mode = 'none'\n", "profiles.default: a name is 1-64"),
        ("[cas.ca]\nkey_label = 'x'\nra_key_label = 'y'\n", "cas.ca: a name is 1-64"),
        ("[cas.r]\nkey_label = 'x'\n", "cas.r.ra_key_label or cas.r.ra_key_id is required"),
        ("[cas.r]\nkey_label = 'x'\nra_key_label = 'x'\n", "cas.r: the RA key must not be"),
        ("[cas.r]\nkey_label = 'x'\nra_key_label = 'y'\nsize = 1\n", "cas.r.size: unknown key"),
        (
            "[profiles.x]\nchallenge_mode = 'webhook'\n[profiles.x.webhook]\n"
            "url = 'http://127.0.0.1:1/'\nsecret = 'inline-secret-0123456789'\n",
            "profiles.x.webhook.secret",
        ),
        (
            "[profiles.x]\nchallenge_mode = 'none'\ncaps = ['Teleport']\n",
            "profiles.x.caps: unknown capability 'Teleport'",
        ),
        (
            "[profiles.x]\nchallenge_mode = 'one_time'\nchallenge_ttl_seconds = 0\n",
            "profiles.x.challenge_ttl_seconds must be at least 1",
        ),
    ],
)
def test_config_errors_name_profile_and_key(
    pca: SoftCa, tmp_path: Path, extra: str, message: str
) -> None:
    config = write_config(pca, tmp_path, extra)
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    assert message in str(error.value)


def test_server_refuses_to_start_on_a_profile_error(pca: SoftCa, tmp_path: Path) -> None:
    config = write_config(
        pca,
        tmp_path,
        "[profiles.x]\nchallenge_mode = 'none'\n[profiles.x.template]\nkey_types = ['dsa']\n",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hsmscep",
            "serve",
            "--config",
            str(config),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "profiles.x.template.key_types" in result.stderr


# ---- a profile with a CA of its own ----------------------------------------------------------


def crl_of(http: httpx.Client, path: str) -> x509.CertificateRevocationList:
    response = http.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pkix-crl"
    return x509.load_der_x509_crl(response.content)


def crl_url(cert: x509.Certificate) -> str:
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    [point] = list(points)
    assert point.full_name is not None
    return str(point.full_name[0].value)


def test_profile_with_its_own_ca(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    response = pserver.get("/scep/netgear", params={"operation": "GetCACert"})
    routers = client.parse_ca_certs(response.content)
    assert routers[0].subject == name("CN=routers CA") and routers[0] != ca_certs[0]
    assert routers[1].issuer == routers[0].subject  # its own RA certificate
    main_before = stored(pca)
    value = new_challenge(pserver, "netgear")
    request = request_for(routers, value, "CN=switch-1")
    cert = certificate(send(pserver, "/scep/netgear", request, routers), routers)
    with pytest.raises(ValueError):
        cert.verify_directly_issued_by(ca_certs[0])
    # Stored by its own CA, with its own CRL and certificate URLs.
    assert stored(pca) == main_before
    with sqlite3.connect(pca.directory / "routers.db") as db:
        serials = [int(row[0], 16) for row in db.execute("SELECT serial FROM certificates")]
        hashes_stored = [row[0] for row in db.execute("SELECT hash FROM challenges")]
    assert serials == [cert.serial_number]
    assert challenge_hash(value) in hashes_stored
    assert crl_url(cert) == "http://pki.example/crl/routers.crl"
    main = certificate(
        send(pserver, "/scep", request_for(ca_certs, pca.challenge, "CN=m"), ca_certs), ca_certs
    )
    assert crl_url(main) == "http://pki.example/crl/ca.crl"
    ca_der = pserver.get("/ca/routers.crt").content
    assert x509.load_der_x509_certificate(ca_der) == routers[0]

    # Revoked through the admin API of its CA: in its CRL, not in the default CA's.
    revoke = pserver.post(
        f"/admin/certificates/{cert.serial_number:x}/revoke",
        params={"ca": "routers"},
        json={"reason": "keyCompromise"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert revoke.status_code == 200, revoke.text
    wrong_ca = pserver.post(
        f"/admin/certificates/{cert.serial_number:x}/revoke",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert wrong_ca.status_code == 404
    own = crl_of(pserver, "/crl/routers.crl")
    assert own.is_signature_valid(routers[0].public_key())  # type: ignore[arg-type]
    assert own.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    default = crl_of(pserver, "/crl/ca.crl")
    assert default.is_signature_valid(ca_certs[0].public_key())  # type: ignore[arg-type]
    assert default.get_revoked_certificate_by_serial_number(cert.serial_number) is None
    for missing in ("/crl/nope.crl", "/crl/default.crl", "/ca/nope.crt"):
        assert pserver.get(missing).status_code == 404
    unknown_ca = pserver.get(
        "/admin/pending",
        params={"ca": "nope"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert unknown_ca.status_code == 404


def test_a_profile_naming_an_unknown_ca_is_a_config_error(pca: SoftCa, tmp_path: Path) -> None:
    config = write_config(pca, tmp_path, "[profiles.x]\nca = 'nope'\nchallenge_mode = 'none'\n")
    with pytest.raises(ConfigError, match=r"profiles\.x\.ca: no CA 'nope'"):
        load_settings(config)


def test_manual_approval_issues_with_the_profile_template(
    pca: SoftCa, pserver: httpx.Client, ca_certs: list[x509.Certificate]
) -> None:
    key = rsa_key(2)
    subject = name("CN=held-1")
    signer = client.self_signed_signer(key, subject)
    request = client.build_pkcs_req(
        key=key,
        ca_certs=ca_certs,
        challenge=WIFI_CHALLENGE,
        subject=subject,
        signer_cert=signer,
        transaction_id="held-transaction-1",
    )
    first = send(pserver, "/scep/held", request, ca_certs)
    assert first.pki_status == "3"  # PENDING
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    listed = pserver.get("/admin/pending", headers=auth).json()
    [entry] = [p for p in listed if p["transaction_id"] == "held-transaction-1"]
    assert entry["profile"] == "held"
    approve = pserver.post(f"/admin/pending/{entry['id']}/approve", headers=auth)
    assert approve.status_code == 200, approve.text
    poll = client.build_cert_poll(
        key=key,
        ca_certs=ca_certs,
        transaction_id="held-transaction-1",
        subject=subject,
        signer_cert=signer,
    )
    cert = certificate(send(pserver, "/scep/held", poll, ca_certs), ca_certs)
    assert validity(cert) == timedelta(days=10, minutes=5)
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]


def scepclient(
    url: str, challenge: str, workdir: Path, cn: str
) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("scepclient")
    if binary is None:
        pytest.skip("scepclient not installed (apt-get install scep)")
    workdir.mkdir(parents=True)
    return subprocess.run(
        [binary, "-server-url", url, "-challenge", challenge, "-cn", cn]
        + [
            "-private-key",
            str(workdir / "client.key"),
            "-certificate",
            str(workdir / "client.pem"),
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---- the real path: `hsmscep init --ca`, `hsmscep serve` on SoftHSM2, scepclient ------------


@pytest.fixture(scope="module")
def real_pca(
    softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory, webhook: Webhook
) -> DevCa:
    directory = tmp_path_factory.mktemp("profiles-real")
    write_secrets(directory)
    extra = PROFILES.format(port=webhook.port)
    ca = make_ca(softhsm_dir, directory, "profiles-ca", extra_config=extra)
    init = subprocess.run(
        [sys.executable, "-m", "hsmscep", "init", "--config", str(ca.config), "--ca", "routers"]
        + ["--subject", "CN=routers CA"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    assert "generated CA key" in init.stdout and (directory / "routers-ca.pem").exists()
    return ca


@pytest.fixture(scope="module")
def real_pserver(real_pca: DevCa) -> Iterator[Server]:
    srv = start_server(real_pca)
    yield srv
    srv.stop()
    output = srv.output()
    assert "Traceback" not in output
    # No challenge value, shared secret or admin token is ever logged.
    for secret in (real_pca.challenge, WIFI_CHALLENGE, HOOK_SECRET.decode(), ADMIN_TOKEN):
        assert secret not in output


@pytest.mark.hsm
@pytest.mark.interop
def test_scepclient_enrolls_at_a_profile_with_a_one_time_challenge(
    real_pserver: Server, tmp_path: Path
) -> None:
    with httpx.Client(base_url=real_pserver.url, timeout=TIMEOUT) as http:
        value = new_challenge(http, "otp")
        netgear = http.get("/scep/netgear", params={"operation": "GetCACert"})
    # The CA `hsmscep init --ca routers` made in the token serves its profile.
    routers = client.parse_ca_certs(netgear.content)
    assert routers[0].subject == name("CN=routers CA")
    first = scepclient(f"{real_pserver.url}/scep/otp", value, tmp_path / "a", "sc-otp")
    assert first.returncode == 0, first.stdout + first.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "a" / "client.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sc-otp"
    again = scepclient(f"{real_pserver.url}/scep/otp", value, tmp_path / "b", "sc-otp-2")
    assert again.returncode != 0 and not (tmp_path / "b" / "client.pem").exists()
