"""The in-process harness: the real app (routes, error map, lifespan, pool, SQLite store) with
software keys, driven over ASGI. No subprocess, no SoftHSM2 token, no socket.

`soft_ca()` writes what `hsmscep init` would (a config file, CA and RA certificates) with
software keys; `serve()` runs the app's lifespan and yields an httpx client bound to it:
httpx.ASGITransport over the app, on an event loop in a helper thread (an anyio blocking
portal) so that the synchronous tests and their helpers drive it like a live server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from starlette.types import ASGIApp, Receive, Scope, Send

from hsmscep.cli.dev import dev_config
from hsmscep.config.settings import Settings, load_settings
from hsmscep.hsm.pool import SigningPool
from hsmscep.testing.softkeys import PrivateKey, SoftKeyring, SoftKeys
from hsmscep.web.app import create_app

# The config names a PKCS#11 module like any other; with SoftKeys nothing ever loads it.
NO_MODULE = "/nonexistent/libpkcs11-unused.so"


@dataclass(frozen=True)
class SoftCa:
    """A CA on disk (config, certificates, SQLite store) whose keys live in `keys`."""

    directory: Path
    config: Path
    settings: Settings
    challenge: str
    keys: SoftKeys

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ra_cert(self) -> Path:
        return self.directory / "ra.pem"

    @property
    def db_path(self) -> Path:
        """The SQLite store dev_config names (read here, not from Settings)."""
        return self.directory / "hsmscep.db"


def soft_ca(directory: Path, label: str, ca_key: str = "rsa2048", extra_config: str = "") -> SoftCa:
    """The software twin of tests.conftest.make_ca: same config file, same certificate profile."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pin").write_text("unused\n")
    (directory / "challenge").write_text(f"secret-{label}\n")
    config = directory / "hsmscep.toml"
    config.write_text(dev_config(NO_MODULE, label, "pin", "challenge") + extra_config)
    keys = SoftKeys()
    ca_private: PrivateKey = (
        ec.generate_private_key(ec.SECP256R1())
        if ca_key == "ec-p256"
        else rsa.generate_private_key(65537, 2048)
    )
    ra_private = rsa.generate_private_key(65537, 2048)
    keys.add(ca_private)
    keys.add(ra_private)
    ca_cert = ca_certificate(ca_private, x509.Name.from_rfc4514_string(f"CN=test CA {label}"))
    ra_cert = ra_certificate(ca_private, ca_cert, ra_private.public_key())
    # dev_config names ca.pem and ra.pem beside the config file.
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(Encoding.PEM))
    (directory / "ra.pem").write_bytes(ra_cert.public_bytes(Encoding.PEM))
    return SoftCa(directory, config, load_settings(config), f"secret-{label}", keys)


@dataclass(frozen=True)
class CaCerts:
    """A CA's certificates as its workers' keys are looked up by (softkeys.CertSource)."""

    ca_cert: x509.Certificate
    ra_sign_cert: x509.Certificate
    decrypt: Sequence[tuple[object, x509.Certificate]]
    previous_signers: Sequence[tuple[object, x509.Certificate]] = ()

    @classmethod
    def of(cls, ca: SoftCa) -> CaCerts:
        ca_cert = x509.load_pem_x509_certificate(ca.ca_cert.read_bytes())
        ra_cert = x509.load_pem_x509_certificate(ca.ra_cert.read_bytes())
        return cls(ca_cert, ra_cert, [(None, ra_cert)])


@asynccontextmanager
async def soft_pool(ca: SoftCa) -> AsyncIterator[SigningPool[SoftKeyring]]:
    """A started one-worker signing pool over the CA's software keys, for service tests."""
    certs = CaCerts.of(ca)
    pool: SigningPool[SoftKeyring] = SigningPool(
        lambda: ca.keys.keyring(certs), size=1, max_pending=8, close_context=SoftKeyring.close
    )
    try:
        await pool.start()
        yield pool
    finally:
        await pool.aclose()


def add_ca(ca: SoftCa, name: str, subject: str) -> x509.Certificate:
    """Software keys and certificates for `[cas.<name>]`, where `hsmscep init --ca` puts them."""
    ca_private = rsa.generate_private_key(65537, 2048)
    ra_private = rsa.generate_private_key(65537, 2048)
    ca.keys.add(ca_private)
    ca.keys.add(ra_private)
    ca_cert = ca_certificate(ca_private, x509.Name.from_rfc4514_string(subject))
    ra_cert = ra_certificate(ca_private, ca_cert, ra_private.public_key())
    (ca.directory / f"{name}-ca.pem").write_bytes(ca_cert.public_bytes(Encoding.PEM))
    (ca.directory / f"{name}-ra.pem").write_bytes(ra_cert.public_bytes(Encoding.PEM))
    return ca_cert


@contextmanager
def serve(ca: SoftCa, settings: Settings | None = None) -> Iterator[httpx.Client]:
    """The app for `ca` with its lifespan running; requests go over ASGI in this process."""
    app = create_app(settings or ca.settings, keys=ca.keys)
    with start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(app.router.lifespan_context(app)) as state:
            asgi = httpx.ASGITransport(app=_with_state(app, state), client=("127.0.0.1", 50000))
            transport = _PortalTransport(portal, asgi)
            with httpx.Client(transport=transport, base_url="http://127.0.0.1") as http:
                yield http


def _with_state(app: ASGIApp, state: Mapping[str, Any] | None) -> ASGIApp:
    """Hand each request the lifespan state, as uvicorn does (a shallow copy per request)."""

    async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["state"] = dict(state or {})
        await app(scope, receive, send)

    return with_state


class _PortalTransport(httpx.BaseTransport):
    """A synchronous httpx transport that runs each request through ASGI on the portal's loop."""

    def __init__(self, portal: BlockingPortal, asgi: httpx.ASGITransport) -> None:
        self._portal, self._asgi = portal, asgi

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> httpx.Response:
            response = await self._asgi.handle_async_request(request)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        return self._portal.call(send)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def ca_certificate(
    key: PrivateKey, subject: x509.Name, now: datetime | None = None
) -> x509.Certificate:
    """A self-signed CA certificate like `hsmscep init` writes (at `now`, default the clock)."""
    now = now or datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def ra_certificate(
    ca_key: PrivateKey, ca_cert: x509.Certificate, public_key: rsa.RSAPublicKey
) -> x509.Certificate:
    """An RA certificate for signing and key transport alike, like `hsmscep init` writes."""
    now = datetime.now(UTC)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cn = ca_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string(f"CN={cn} SCEP RA"))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=730))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(ca_key, hashes.SHA256())
    )
