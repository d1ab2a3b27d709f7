"""Pre-flight: what `serve` needs, checked once in the parent before any worker starts.

A mistake found here is one line and the exit code of its class (cli.exits); found by N
spawned workers it was N tracebacks and a parent exiting 0. Each token is logged into once
(a wrong PIN is never tried twice: network HSMs lock the user role after a few failures),
and the session and module are closed again before uvicorn starts its workers.
"""

from __future__ import annotations

import errno
import socket
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509

from hsmscep.config.settings import Settings
from hsmscep.errors import ConfigError, ListenError, StoreError
from hsmscep.hsm.refs import KeyRef, TokenRef


def certificate_files(settings: Settings) -> Iterator[tuple[str, Path]]:
    """(what, path) of every certificate file the configuration names."""
    yield "ca.cert", settings.ca.cert
    if settings.ca.chain is not None:
        yield "ca.chain", settings.ca.chain
    if settings.ca.cross_cert is not None:
        yield "rollover cross_cert", settings.ca.cross_cert
    yield "ra.cert", settings.ra.cert
    if settings.ra_split:
        yield "ra_decrypt.cert", settings.ra_decrypt.cert
    upcoming = settings.rollover.next
    if upcoming is not None:
        yield "rollover next.ca_cert", upcoming.ca_cert
        yield "rollover next.ra_cert", upcoming.ra_cert
        for what, path in (("chain", upcoming.ca_chain), ("cross_cert", upcoming.cross_cert)):
            if path is not None:
                yield f"rollover next.{what}", path
    for _, path in settings.rollover.previous_ra:
        yield "rollover previous_ra.cert", path
    for extra in settings.cas:
        yield f"cas.{extra.name}.cert", extra.ca_cert
        if extra.ca_chain is not None:
            yield f"cas.{extra.name}.chain", extra.ca_chain
        yield f"cas.{extra.name}.ra_cert", extra.ra_cert


def keys(settings: Settings) -> list[tuple[str, KeyRef, Path]]:
    """(role, key, its certificate) of every private key the configuration names, each once."""
    found = [("CA", settings.ca.key, settings.ca.cert), ("RA", settings.ra.key, settings.ra.cert)]
    found.append(("RA decryption", settings.ra_decrypt.key, settings.ra_decrypt.cert))
    upcoming = settings.rollover.next
    if upcoming is not None:
        found += [("next CA", upcoming.ca_key, upcoming.ca_cert)]
        found += [("next RA", upcoming.ra_key, upcoming.ra_cert)]
    found += [("previous RA", key, path) for key, path in settings.rollover.previous_ra]
    for extra in settings.cas:
        found += [(f"CA {extra.name}", extra.ca_key, extra.ca_cert)]
        found += [(f"RA {extra.name}", extra.ra_key, extra.ra_cert)]
    unique: dict[KeyRef, tuple[str, Path]] = {}
    for role, ref, cert in found:
        unique.setdefault(ref, (role, cert))
    return [(role, ref, cert) for ref, (role, cert) in unique.items()]


def check_certificate_file(what: str, path: Path) -> None:
    """ConfigError unless `path` is a readable file of PEM certificates."""
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a directory, not a certificate file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} does not exist (run `hsmscep init` first?)") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        der = data[:1] == b"0"  # a DER SEQUENCE
        hint = " (DER? convert it: openssl x509 -inform der -in F -out F.pem)" if der else ""
        raise ConfigError(f"{what}: {path} is not a PEM certificate{hint}")
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{what}: {path}: not a valid PEM certificate: {exc}") from None


def check_store(what: str, path: Path) -> None:
    """StoreError unless the database can be opened (or created) for writing at `path`."""
    directory = path.parent
    if not directory.is_dir():
        raise StoreError(f"{what}: directory {directory} does not exist (create it first)")
    try:
        # os.access says yes to root on a read-only mount: try to write instead.
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise StoreError(f"{what}: directory {directory} is not writable: {exc.strerror}") from None
    if path.is_dir():
        raise StoreError(f"{what}: {path} is a directory, not a database file")
    if not path.exists():
        return
    try:
        with open(path, "r+b"):
            pass
        connection = sqlite3.connect(f"file:{path}?mode=rw", uri=True)
        try:
            connection.execute("PRAGMA schema_version").fetchone()
        finally:
            connection.close()
    except OSError as exc:
        raise StoreError(f"{what}: cannot open {path} for writing: {exc.strerror}") from None
    except sqlite3.Error as exc:
        raise StoreError(f"{what}: {path} is not a usable SQLite database: {exc}") from None


def check_listen(host: str, port: int) -> None:
    """ListenError unless `host` resolves and `port` is free on it (bound, then released)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"server.host {host!r} does not resolve: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As uvicorn binds: SO_REUSEADDR, so a socket in TIME_WAIT is no conflict.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            where = f"{host}:{port}"
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(f"server.port: {where} is already in use") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ListenError(f"server.host: {host} is not an address of this host") from None
            raise ListenError(f"cannot listen on {where}: {exc.strerror}") from None


def check_hsm(settings: Settings) -> list[str]:
    """Log into every token once and find every key; lines saying what was found."""
    from hsmscep.cli.tokens import TokenCheck

    by_token: dict[TokenRef, list[tuple[str, KeyRef, Path]]] = {}
    for role, ref, cert in keys(settings):
        by_token.setdefault(ref.token, []).append((role, ref, cert))
    lines: list[str] = []
    with TokenCheck() as check:
        for token, token_keys in by_token.items():
            session = check.log_in(token)
            lines.append(f"token {check.describe(token)}: logged in")
            for role, ref, cert in token_keys:
                check.find_key(session, token, role, ref, cert)
                lines.append(f"  {role} key {ref.describe()}: found, certified by {cert.name}")
    return lines


def preflight(settings: Settings, *, listen: bool = True) -> list[str]:
    """Every check, cheapest first, the HSM login last; raise the first failure."""
    lines: list[str] = []
    if listen:
        check_listen(settings.server.host, settings.server.port)
        lines.append(f"listen {settings.server.host}:{settings.server.port}: free")
    for what, path in certificate_files(settings):
        check_certificate_file(what, path)
        lines.append(f"{what} {path}: readable PEM")
    check_store("store.path", settings.store.path)
    lines.append(f"store.path {settings.store.path}: writable")
    for extra in settings.cas:
        check_store(f"cas.{extra.name}.store", extra.db_path)
        lines.append(f"cas.{extra.name}.store {extra.db_path}: writable")
    return lines + check_hsm(settings)
