"""Shared fixtures: a real SoftHSM2 token, a dev CA inside it, and real uvicorn servers.

One SoftHSM2 config per test session (the module reads SOFTHSM2_CONF once per process), set
before anything loads the PKCS#11 module. Servers run as `hsmscep serve` subprocesses on
127.0.0.1 with a free port, exactly as an operator would start them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.cli.bootstrap import InitOptions, init
from hsmscep.cli.dev import dev_config
from hsmscep.config.settings import Settings, load_settings
from hsmscep.hsm import devtoken
from hsmscep.hsm.keyring import KeySource
from tests import pgcluster

SHARED = Path(__file__).resolve().parents[2] / "shared"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the golden vectors live in ../shared")
    return SHARED


@pytest.fixture(scope="session")
def softhsm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        devtoken.find_softhsm()
    except Exception as exc:
        pytest.skip(str(exc))
    directory = tmp_path_factory.mktemp("softhsm")
    devtoken.write_conf(directory)
    return directory


@dataclass(frozen=True)
class DevCa:
    directory: Path
    config: Path
    settings: Settings
    challenge: str
    token: devtoken.DevToken

    @property
    def db_path(self) -> Path:
        """The SQLite store dev_config names (read here, not from Settings)."""
        return self.directory / "hsmscep.db"


def make_ca(
    softhsm_dir: Path,
    directory: Path,
    label: str,
    ca_key: str = "rsa2048",
    extra_config: str = "",
) -> DevCa:
    """A token called `label` in the session's SoftHSM2 dir, with CA and RA keys and certs."""
    token = devtoken.ensure_token(softhsm_dir, label=label)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(token.pin_file, directory / "pin")
    (directory / "challenge").write_text(f"secret-{label}\n")
    config = directory / "hsmscep.toml"
    config.write_text(dev_config(token.module, label, "pin", "challenge") + extra_config)
    settings = load_settings(config)
    init(settings, InitOptions(ca_key=ca_key, subject=f"CN=test CA {label}"))
    return DevCa(directory, config, settings, f"secret-{label}", token)


@pytest.fixture(scope="session")
def dev_ca(softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DevCa:
    return make_ca(softhsm_dir, tmp_path_factory.mktemp("ca"), "hsmscep-test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return int(self.process.returncode)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(
    ca: DevCa,
    env: Mapping[str, str] | None = None,
    *,
    args: tuple[str, ...] = (),
    port: int | None = None,
) -> Server:
    """Run `hsmscep serve` for `ca` (on `port`, default a free one) and wait until /healthz
    answers (bounded: 60 s)."""
    port = port or free_port()
    log = ca.directory / f"server-{port}.log"
    full_env = dict(os.environ) | dict(env or {})
    command = [sys.executable, "-m", "hsmscep", "serve", "--config", str(ca.config)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ca.directory,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.output()}")
        try:
            with urllib.request.urlopen(f"{server.url}/healthz", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not come up:\n{server.output()}")


@pytest.fixture(scope="session")
def server(dev_ca: DevCa) -> Iterator[Server]:
    srv = start_server(dev_ca)
    yield srv
    srv.stop()


def key_source(ca: DevCa) -> KeySource:
    """The CA's token keys paired with their certificates, as the server builds them."""
    s = ca.settings
    ra = x509.load_pem_x509_certificate(s.ra.cert.read_bytes())
    return KeySource(
        ca_key=s.ca.key,
        ca_cert=x509.load_pem_x509_certificate(s.ca.cert.read_bytes()),
        ra_sign_key=s.ra.key,
        ra_sign_cert=ra,
        decrypt=[(s.ra_decrypt.key, ra)],
    )


Target = str | httpx.Client
"""Where a request goes: a live server's URL, or a client bound to an app (tests/inprocess.py)."""


def http_request(target: Target, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """`method path` on a live server (URL) or through an in-process client alike."""
    if isinstance(target, httpx.Client):
        return target.request(method, path, **kwargs)
    return httpx.request(method, f"{target}{path}", timeout=kwargs.pop("timeout", 30.0), **kwargs)


def post_pki_message(target: Target, der: bytes, timeout: float = 30.0) -> bytes:
    """POST a pkiMessage; the answer must be a 200 CertRep."""
    response = http_request(
        target,
        "POST",
        "/scep?operation=PKIOperation",
        content=der,
        headers={"Content-Type": "application/x-pki-message"},
        timeout=timeout,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-pki-message"
    return response.content


def software_root(key: rsa.RSAPrivateKey, name: x509.Name, now: datetime) -> x509.Certificate:
    """A self-signed CA certificate with a software key, for tests of pure issuance code."""
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def openssl_serial(cert: x509.Certificate) -> str:
    """The serial as `openssl x509 -serial` prints it: what audit lines must match."""
    printed = subprocess.run(
        ["openssl", "x509", "-noout", "-serial"],
        input=cert.public_bytes(Encoding.PEM),
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    return printed.strip().removeprefix("serial=")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pgcluster.Cluster]:
    """A throwaway PostgreSQL cluster shared by the session's PostgreSQL tests."""
    reason = pgcluster.unavailable()
    if reason is not None:
        pytest.skip(reason)
    with pgcluster.cluster() as cluster:
        yield cluster
