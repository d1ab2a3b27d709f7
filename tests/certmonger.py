"""certmonger for the interop tests: a daemon of our own without D-Bus, getcert talking to it
over its private socket, and the scep-submit helper run directly.

The daemon never touches the system's certmonger state: every directory, the lock and the
socket are under the test's temporary directory. It runs under libfaketime at SPEED, so that
its own poll of a PENDING request (7 days after the answer, certmonger's CM_DELAY_CA_POLL; its
helper gives no delay for PENDING) comes within seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

CERTMONGER = shutil.which("certmonger") or shutil.which("certmonger", path="/usr/sbin")
GETCERT = shutil.which("getcert")
SCEP_SUBMIT = Path("/usr/lib/certmonger/scep-submit")
FAKETIME = next(
    (p for p in Path("/usr/lib").glob("*/faketime/libfaketime.so.1") if p.exists()), None
)
# 7 days of certmonger's clock in about 30 s of ours: its poll of a PENDING request.
SPEED = 20000


@dataclass
class Certmonger:
    """A certmonger daemon of our own and getcert talking to it over its private socket."""

    directory: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str]

    def getcert(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [GETCERT or "getcert", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def status(self, request_id: str) -> dict[str, str]:
        listed = self.getcert("list", "-i", request_id)
        assert listed.returncode == 0, listed.stderr
        fields: dict[str, str] = {}
        for line in listed.stdout.splitlines():
            name, sep, value = line.strip().partition(": ")
            if sep and name not in fields:
                fields[name] = value.strip()
        return fields

    def wait(self, request_id: str, *states: str, timeout: float = 120) -> dict[str, str]:
        """Poll getcert list (bounded) until the request reaches one of `states`."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.status(request_id)
            if fields.get("status") in states:
                return fields
            if time.monotonic() > deadline:
                log = (self.directory / "daemon.log").read_text(errors="replace")[-4000:]
                raise AssertionError(f"{request_id} stuck in {fields}:\n{log}")
            time.sleep(0.5)


def start(directory: Path) -> Certmonger:
    """A certmonger daemon of our own in `directory` (its state, socket and log), under
    libfaketime at SPEED; skips when certmonger or libfaketime is missing."""
    if CERTMONGER is None or GETCERT is None or not SCEP_SUBMIT.exists():
        pytest.skip("certmonger not installed (apt-get install certmonger)")
    if FAKETIME is None:
        pytest.skip("libfaketime not installed (apt-get install faketime)")
    for sub in ("requests", "cas", "tmp", "local", "config"):
        (directory / sub).mkdir()
    # Never the system's certmonger state: every directory and the lock are ours.
    env = dict(os.environ) | {
        "CERTMONGER_REQUESTS_DIR": str(directory / "requests"),
        "CERTMONGER_CAS_DIR": str(directory / "cas"),
        "CERTMONGER_TMPDIR": str(directory / "tmp"),
        "CERTMONGER_LOCAL_CA_DIR": str(directory / "local"),
        "CERTMONGER_CONFIG_DIR": str(directory / "config"),
        "CERTMONGER_SYSTEM_LOCK_FILE": str(directory / "lock"),
        "CERTMONGER_PVT_ADDRESS": f"unix:path={directory / 'sock'}",
    }
    daemon_env = env | {
        "LD_PRELOAD": str(FAKETIME),
        "FAKETIME": f"+0 x{SPEED}",
        "FAKETIME_DONT_RESET": "1",
    }
    with (directory / "daemon.log").open("wb") as log:
        process = subprocess.Popen(
            [CERTMONGER or "certmonger", "-L", "-P", str(directory / "sock"), "-n", "-d", "2"],
            env=daemon_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    daemon = Certmonger(directory, process, env)
    deadline = time.monotonic() + 30
    while daemon.getcert("list-cas").returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail((directory / "daemon.log").read_text(errors="replace"))
        time.sleep(0.2)
    return daemon


def stop(daemon: Certmonger) -> None:
    """End the daemon we started, by its PID."""
    daemon.process.terminate()
    try:
        daemon.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        daemon.process.kill()
        daemon.process.wait(timeout=10)


def scep_submit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCEP_SUBMIT), *args], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )


PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def helper_certs(url: str) -> list[x509.Certificate]:
    """scep-submit -C: GetCACert as certmonger's helper reads it (RA first, then the CA)."""
    done = scep_submit("-u", url, "-C")
    assert done.returncode == 0, done.stdout + done.stderr
    return [x509.load_pem_x509_certificate(m.encode()) for m in PEM.findall(done.stdout)]
