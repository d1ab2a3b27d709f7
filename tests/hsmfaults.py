"""Helpers for the HSM loss tests: the pass-through module (bench/p11shim.c), a CA directory
pointed at another module, p11-kit's remote token server, and a bounded enrollment load.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from bench import p11shim
from hsmscep.config.settings import load_settings
from hsmscep.testing import client
from tests.conftest import DevCa

P11KIT_CLIENT = next(
    (
        p
        for p in (
            "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
            "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
            "/usr/lib/pkcs11/p11-kit-client.so",
        )
        if os.path.exists(p)
    ),
    None,
)


def copy_ca(ca: DevCa, dest: Path, module: str, pin: str | None = None) -> DevCa:
    """`ca`'s directory (certificates, config; a fresh store) using PKCS#11 module `module`."""
    shutil.copytree(ca.directory, dest, ignore=shutil.ignore_patterns("*.db*", "*.log"))
    config = dest / "hsmscep.toml"
    text = re.sub(r'(?m)^module = ".*"$', f'module = "{module}"', config.read_text())
    config.write_text(text)
    if pin is not None:
        (dest / "pin").write_text(pin + "\n")
        return DevCa(dest, config, ca.settings, ca.challenge, ca.token)
    return DevCa(dest, config, load_settings(config), ca.challenge, ca.token)


def login_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@dataclass
class RemoteToken:
    """A token served by `p11-kit server` (a network HSM here): kill and start it at will."""

    socket: Path
    provider: str
    label: str
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            ["p11-kit", "server", "-f", "-n", str(self.socket), "--provider", self.provider]
            + [f"pkcs11:token={self.label}"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own group: it forks a child per connection
        )
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            assert self.process.poll() is None, "p11-kit server exited"
            assert time.monotonic() < deadline, "p11-kit server did not come up"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None:
            # The whole group: a child serving a connection would keep the token reachable.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
        self.process = None


@dataclass
class Outcome:
    status: int
    seconds: float
    retry_after: str | None = None
    pki_status: str | None = None
    serial: int | None = None
    at: float = 0.0


@dataclass
class Load:
    """`threads` clients enrolling back to back against `url` until stopped (bounded)."""

    url: str
    challenge: str
    threads: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ca_certs = client.parse_ca_certs(
            httpx.get(f"{self.url}/scep?operation=GetCACert", timeout=30).content
        )
        self.keys = [rsa.generate_private_key(65537, 2048) for _ in range(self.threads)]

    def start(self) -> None:
        for index in range(self.threads):
            thread = threading.Thread(target=self._run, args=(index,), daemon=True)
            thread.start()
            self._workers.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(timeout=60)

    def successes_since(self, t: float) -> int:
        return sum(1 for o in list(self.outcomes) if o.at >= t and o.pki_status == "0")

    def wait_for(self, check: Callable[[], bool], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.1)
        return check()

    def _run(self, index: int) -> None:
        key = self.keys[index]
        with httpx.Client(timeout=30) as http:
            for n in range(100_000):  # bounded; stop() ends it long before
                if self._stop.is_set():
                    return
                request = client.build_pkcs_req(
                    key=key,
                    ca_certs=self.ca_certs,
                    challenge=self.challenge,
                    subject=x509.Name.from_rfc4514_string(f"CN=load-{index}-{n}"),
                )
                started = time.monotonic()
                try:
                    response = http.post(
                        f"{self.url}/scep?operation=PKIOperation", content=request.der
                    )
                except httpx.HTTPError:
                    self.outcomes.append(Outcome(0, time.monotonic() - started, at=started))
                    continue
                outcome = Outcome(
                    response.status_code,
                    time.monotonic() - started,
                    response.headers.get("retry-after"),
                    at=started,
                )
                if response.status_code == 200:
                    result = client.open_cert_rep(response.content, request, self.ca_certs)
                    outcome.pki_status = result.pki_status
                    if result.certificates:
                        outcome.serial = result.certificates[0].serial_number
                else:
                    time.sleep(0.05)
                self.outcomes.append(outcome)


def stored_serials(db: Path) -> set[int]:
    with closing(sqlite3.connect(db)) as conn:
        return {int(row[0], 16) for row in conn.execute("SELECT serial FROM certificates")}


def build_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench/p11shim.c built once per test session (skip when no compiler or header)."""
    try:
        return p11shim.build(tmp_path_factory.getbasetemp() / "p11shim")
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot build the pass-through module: {exc}")


def private_module(so: Path | str, directory: Path, name: str) -> str:
    """A copy of a module under another name: its own instance in a process (dlopen by path),
    so re-initialising it leaves every other user of the original alone."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    shutil.copy(so, target)
    return str(target)
