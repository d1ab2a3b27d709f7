"""The start-up banner: what a server is about to serve, in facts `hsmscep status` shows too.

`gather` is pure (settings, the certificates already read, the CPU count and the time in;
a Facts out) and `render` turns Facts into lines with a logging level each: a certificate
that expires within EXPIRY_WARNING is a WARNING, one already expired an ERROR. Nothing
secret is in the facts: tokens by module and label or serial, stores by path or URL (whose
password is never in the configuration).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep import __version__
from hsmscep.config.settings import Settings
from hsmscep.hsm.refs import TokenRef
from hsmscep.policy.crl import CA_CERT_PATH, CRL_PATH
from hsmscep.policy.profiles import DEFAULT_CA, DEFAULT_PROFILE
from hsmscep.store.pgdatabase import redact

log = logging.getLogger(__name__)

EXPIRY_WARNING = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class CertFacts:
    """One certificate the server uses: its role ("CA", "RA", "RA decryption", "next CA",
    "next RA") for CA `ca`."""

    ca: str
    role: str
    subject: str
    sha256: str  # as `openssl x509 -fingerprint -sha256` prints it
    not_before: datetime
    not_after: datetime
    path: Path


@dataclass(frozen=True, slots=True)
class ProfileFacts:
    name: str
    ca: str
    endpoints: tuple[str, ...]  # URL paths
    challenge_mode: str
    approval: str  # auto or manual
    ms_template: str | None


@dataclass(frozen=True, slots=True)
class StoreFacts:
    ca: str
    backend: str  # sqlite or postgresql
    location: str  # the file, or the URL (never with a password)


@dataclass(frozen=True, slots=True)
class Facts:
    version: str
    listen: str
    workers: int
    workers_auto: bool
    pool_size: int  # signing threads per process
    pool_auto: bool  # the default size, which grows at start-up for a slow HSM
    max_pending: int
    tokens: tuple[str, ...]
    certificates: tuple[CertFacts, ...]
    stores: tuple[StoreFacts, ...]
    profiles: tuple[ProfileFacts, ...]
    publication: tuple[tuple[str, str, str], ...]  # (CA, certificate path, CRL path)
    now: datetime


def certificate_paths(settings: Settings) -> Iterator[tuple[str, str, Path]]:
    """(CA, role, file) of every certificate the banner shows."""
    yield DEFAULT_CA, "CA", settings.ca.cert
    yield DEFAULT_CA, "RA", settings.ra.cert
    if settings.ra_split:
        yield DEFAULT_CA, "RA decryption", settings.ra_decrypt.cert
    upcoming = settings.rollover.next
    if upcoming is not None:
        yield DEFAULT_CA, "next CA", upcoming.ca_cert
        yield DEFAULT_CA, "next RA", upcoming.ra_cert
    for extra in settings.cas:
        yield extra.name, "CA", extra.ca_cert
        yield extra.name, "RA", extra.ra_cert


def load_certificates(settings: Settings) -> dict[Path, x509.Certificate]:
    """The first certificate of each file the banner shows (pre-flight has checked them)."""
    return {
        path: x509.load_pem_x509_certificates(path.read_bytes())[0]
        for _, _, path in certificate_paths(settings)
    }


def fingerprint(cert: x509.Certificate) -> str:
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def describe_token(token: TokenRef) -> str:
    """As `hsmscep config check` names a token (cli.tokens.TokenCheck.describe), without
    importing the PKCS#11 edge: status never needs it."""
    name = f"label {token.label!r}" if token.label else f"serial {token.serial!r}"
    return f"{name} ({token.module})"


def gather(
    settings: Settings,
    certificates: Mapping[Path, x509.Certificate],
    *,
    cpus: int,
    now: datetime,
) -> Facts:
    """The facts of `settings` with the certificates read from its files."""
    server = settings.server
    workers = server.workers or cpus
    tokens = [settings.pkcs11.token, *settings.pkcs11.replicas]
    for ref in (settings.ca.key, settings.ra.key, settings.ra_decrypt.key):
        tokens.append(ref.token)
    for extra in settings.cas:
        tokens += [extra.ca_key.token, extra.ra_key.token]
    certs = []
    for ca, role, path in certificate_paths(settings):
        cert = certificates[path]
        certs.append(
            CertFacts(
                ca,
                role,
                cert.subject.rfc4514_string(),
                fingerprint(cert),
                cert.not_valid_before_utc,
                cert.not_valid_after_utc,
                path,
            )
        )
    return Facts(
        version=__version__,
        listen=f"{server.host}:{server.port}",
        workers=workers,
        workers_auto=server.workers == 0,
        pool_size=server.pool_size or max(1, cpus // workers),
        pool_auto=server.pool_size == 0,
        max_pending=server.max_pending,
        tokens=tuple(dict.fromkeys(describe_token(t) for t in tokens)),
        certificates=tuple(certs),
        stores=tuple(_stores(settings)),
        profiles=tuple(_profiles(settings)),
        publication=tuple(
            (name, CA_CERT_PATH, CRL_PATH)
            if name == DEFAULT_CA
            else (name, f"/ca/{name}.crt", f"/crl/{name}.crl")
            for name in settings.ca_names
        ),
        now=now,
    )


def _stores(settings: Settings) -> Iterator[StoreFacts]:
    store = settings.store
    if store.url is not None:
        # The configuration refuses a password in the URL; redact() all the same.
        yield StoreFacts(DEFAULT_CA, "postgresql", redact(store.url))
    else:
        yield StoreFacts(DEFAULT_CA, "sqlite", str(store.path))
    for extra in settings.cas:
        yield StoreFacts(extra.name, "sqlite", str(extra.db_path))


def _profiles(settings: Settings) -> Iterator[ProfileFacts]:
    for profile in settings.profiles.all():
        if profile.name == DEFAULT_PROFILE:
            endpoints: tuple[str, ...] = ("/scep", "/cgi-bin/pkiclient.exe")
        else:
            endpoints = (f"/scep/{profile.name}",)
        yield ProfileFacts(
            profile.name,
            profile.ca,
            endpoints,
            profile.challenge_mode,
            "manual" if profile.manual_approval else "auto",
            profile.ms_template,
        )


def expiry(cert: CertFacts, now: datetime) -> tuple[int, str] | None:
    """(level, text) when the certificate needs an operator: expired, near expiry, not yet valid."""
    what = f"{cert.role} certificate of CA {cert.ca} ({cert.subject}, {cert.path})"
    left = cert.not_after - now
    if left <= timedelta(0):
        return logging.ERROR, f"{what} EXPIRED on {_when(cert.not_after)}"
    if left < EXPIRY_WARNING:
        days = left.total_seconds() / 86400
        return logging.WARNING, f"{what} expires in {days:.1f} days, on {_when(cert.not_after)}"
    if cert.not_before > now:
        return logging.WARNING, f"{what} is not valid before {_when(cert.not_before)}"
    return None


def render(facts: Facts) -> list[tuple[int, str]]:
    """The banner: (logging level, line) pairs, the problems last so they stand out."""
    lines = [f"hsmscep {facts.version}: listening on {facts.listen}"]
    workers = f"{facts.workers} worker process{'es' if facts.workers != 1 else ''}"
    pool = f"{facts.pool_size} signing thread{'s' if facts.pool_size != 1 else ''} each"
    if facts.pool_auto:
        pool += " (default; more at start-up if the HSM round trip leaves the CPU idle)"
    auto = " (auto: one per CPU)" if facts.workers_auto else ""
    lines.append(f"{workers}{auto}, {pool}, max_pending {facts.max_pending}")
    lines += [f"token: {token}" for token in facts.tokens]
    for c in facts.certificates:
        days = (c.not_after - facts.now).total_seconds() / 86400
        lines.append(
            f"{c.role} ({c.ca}): {c.subject}; SHA-256 {c.sha256}; notAfter"
            f" {_when(c.not_after)} ({days:.0f} days)"
        )
    lines += [f"store ({s.ca}): {s.backend} {s.location}" for s in facts.stores]
    for ca, cert, crl in facts.publication:
        lines.append(f"CA {ca} publishes {cert} and {crl}")
    for p in facts.profiles:
        also = f", or a CSR naming template {p.ms_template!r}" if p.ms_template else ""
        lines.append(
            f"profile {p.name} (CA {p.ca}): {', '.join(p.endpoints)}{also}; challenge"
            f" {p.challenge_mode}; approval {p.approval}"
        )
    problems = [found for c in facts.certificates if (found := expiry(c, facts.now))]
    return [(logging.INFO, line) for line in lines] + problems


def log_banner(settings: Settings, *, cpus: int, now: datetime) -> None:
    """Log the banner of `settings`, once, in the serving parent process."""
    facts = gather(settings, load_certificates(settings), cpus=cpus, now=now)
    for level, line in render(facts):
        log.log(level, "%s", line)


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")
