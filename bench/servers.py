"""Bring the two servers up on 127.0.0.1, and watch their processes (CPU time, RSS).

`start_hsmscep` is the one place that knows how hsmscep is initialised and started;
`start_scepserver` does the same for micromdm's scepserver (Debian package `scep`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hsmscep.hsm.devtoken import find_softhsm
from hsmscep.testing.cacerts import parse_ca_certs

HOST = "127.0.0.1"  # every byte of bench traffic stays on loopback


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that a bench stopped with `kill` runs its `finally`
    blocks and stops the servers, the load generator and the PostgreSQL cluster it started
    (a plain SIGTERM would leave them running and their temp dirs behind)."""

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)


READY_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class HsmInfo:
    """Where a server's keys live, for the raw-HSM ceiling (bench/ceiling.py)."""

    module: str
    softhsm2_conf: str
    token_label: str
    pin: str
    # None: ceiling.py picks the keys on the token by type and usage.
    ra_key_label: str | None = None
    ca_key_label: str | None = None


@dataclass(slots=True)
class ServerHandle:
    name: str  # "hsmscep" or "scepserver"
    scenario: str  # "rsa2048" or "p256" (the CA key)
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    # CA certificates obtained out of band (not from GetCACert): issued certificates must
    # chain to one of them.
    anchors: list[x509.Certificate]
    hsm: HsmInfo | None = None
    ca_certs: list[x509.Certificate] = field(default_factory=list)  # GetCACert, once up
    variant: str | None = None  # hsmscep built from another tree (bench/variants.py)
    store: str = "sqlite"  # hsmscep's store backend: "sqlite" or "postgresql"
    prefill: int = 0  # certificates in the store before the run (bench/prefill.py)
    # CPU seconds so far of a database server the instance uses (PostgreSQL), or None.
    database_cpu: Callable[[], float] | None = None

    @property
    def label(self) -> str:
        """Series name: server, variant, store (PostgreSQL only), pre-filled rows, CA key type,
        e.g. "hsmscep-p256", "hsmscep@before-p256", "hsmscep-pg-p256", "hsmscep-pg-1000000-p256"."""
        name = f"{self.name}@{self.variant}" if self.variant else self.name
        store = "-pg" if self.store == "postgresql" else ""
        rows = f"-{self.prefill}" if self.prefill else ""
        return f"{name}{store}{rows}-{self.scenario}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def processes(self) -> list[psutil.Process]:
        """The server process and all its descendants (uvicorn workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes()]

    def stop(self) -> None:
        """Terminate the process tree we started; kill what is left after 10 s."""
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    subprocess.run(cmd, check=True, env=env, cwd=cwd, timeout=120, capture_output=True)


def _spawn(
    cmd: list[str], workdir: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log = (workdir / "server.log").open("ab")
    # Own session: a Ctrl-C in the driver's terminal must not hit the servers mid-phase.
    return subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_ready(handle: ServerHandle) -> None:
    """Poll GetCACert until it answers (bounded), then keep its certificates on the handle."""
    url = f"{handle.url}/scep?operation=GetCACert"
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            log = (handle.workdir / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{handle.name} exited with {handle.proc.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                handle.ca_certs = parse_ca_certs(resp.read())
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    handle.stop()
    raise RuntimeError(f"{handle.name} not ready on {handle.url} after {READY_TIMEOUT:.0f} s")


# ---------------------------------------------------------------------------- scepserver


def start_scepserver(workdir: Path, port: int, challenge: str) -> ServerHandle:
    """micromdm scepserver 2.1.0 with a fresh RSA-2048 CA in `workdir/depot`.

    It has no bind flag and listens on every interface; we only ever talk to 127.0.0.1.
    """
    binary = shutil.which("scepserver")
    if binary is None:
        raise RuntimeError("scepserver not found (Debian package `scep`)")
    workdir.mkdir(parents=True, exist_ok=True)
    depot = workdir / "depot"
    if not (depot / "ca.pem").exists():
        _run([binary, "ca", "-init", "-depot", str(depot), "-keySize", "2048"], cwd=workdir)
    handle = ServerHandle(
        name="scepserver",
        scenario="rsa2048",
        port=port,
        proc=_spawn(_scepserver_cmd(binary, depot, port, challenge), workdir),
        workdir=workdir,
        anchors=[x509.load_pem_x509_certificate((depot / "ca.pem").read_bytes())],
    )
    wait_ready(handle)
    return handle


def _scepserver_cmd(binary: str, depot: Path, port: int, challenge: str) -> list[str]:
    return [binary, "-depot", str(depot), "-port", str(port), "-challenge", challenge]


def reset_scepserver(handle: ServerHandle, challenge: str) -> None:
    """Restart scepserver on an empty depot that keeps the same CA key and certificate.

    Its serial file races under concurrency and restarts numbering, and its index is scanned
    linearly per request: a clean depot per load phase keeps one phase from spoiling the next.
    """
    handle.stop()
    depot = handle.workdir / "depot"
    for path in depot.iterdir():
        if path.name not in ("ca.key", "ca.pem"):
            path.unlink()
    binary = shutil.which("scepserver") or "scepserver"
    handle.proc = _spawn(_scepserver_cmd(binary, depot, handle.port, challenge), handle.workdir)
    wait_ready(handle)


# ---------------------------------------------------------------------------- hsmscep


def start_hsmscep(
    scenario: str,
    workdir: Path,
    port: int,
    challenge: str,
    workers: str = "auto",
    *,
    binary: Path | None = None,
    variant: str | None = None,
    store_env: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> ServerHandle:
    """hsmscep with its CA key per `scenario` (rsa2048 | p256), state in `workdir`.

    `binary` and `variant`: a variant's own `hsmscep` executable, and its name.

    `hsmscep dev` makes a project-local SoftHSM2 token (workdir/softhsm2.conf, tokens/, pin),
    runs `hsmscep init` (CA key "hsmscep-ca", one RA key "hsmscep-ra" for signing and
    decryption, ca.pem/ra.pem) and serves with the given workers. Adapt here, and only here,
    when the init/config interface changes; keep the handle's anchors and hsm filled.
    `store_env` (HSMSCEP_STORE_URL, HSMSCEP_STORE_PASSWORD) puts its store in PostgreSQL.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    challenge_file = workdir / "challenge"  # dev keeps an existing challenge file
    if not challenge_file.exists():
        challenge_file.write_text(challenge + "\n")
        challenge_file.chmod(0o600)
    extra_env = {**(store_env or {}), **(env or {})}
    cmd = [str(binary or _hsmscep_bin()), "dev", "--dir", str(workdir), "--ca-key", scenario]
    cmd += ["--host", HOST, "--port", str(port), "--workers", workers]
    handle = ServerHandle(
        name="hsmscep",
        scenario=scenario,
        port=port,
        proc=_spawn(cmd, workdir, {**os.environ, **extra_env} if extra_env else None),
        workdir=workdir,
        anchors=[],
        variant=variant,
        store="postgresql" if store_env else "sqlite",
    )
    wait_ready(handle)
    # Written by init before serving: the CA certificate, taken from disk, not from GetCACert.
    handle.anchors = x509.load_pem_x509_certificates((workdir / "ca.pem").read_bytes())
    handle.hsm = HsmInfo(
        module=find_softhsm(),  # the module `hsmscep dev` picks
        softhsm2_conf=str(workdir / "softhsm2.conf"),
        token_label="hsmscep-dev",
        pin=(workdir / "pin").read_text().strip(),
        ra_key_label="hsmscep-ra",
        ca_key_label="hsmscep-ca",
    )
    return handle


def _hsmscep_bin() -> str:
    here = Path(sys.executable).parent / "hsmscep"
    return str(here) if here.exists() else "hsmscep"


def cert_ders(certs: list[x509.Certificate]) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


# ---------------------------------------------------------------------------- monitoring


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of live processes (a dead one contributes nothing)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def host_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, summed over cores."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return busy, getattr(t, "steal", 0.0)


def peak_rss_hwm(pid: int) -> int | None:
    """The kernel's RSS high-water mark (VmHWM) of a live process, in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssSampler(threading.Thread):
    """Samples the RSS of each server process every `interval` s until stopped (bounded)."""

    MAX_SAMPLES = 100_000  # ~7 h at 0.25 s: far beyond any mode, keeps memory bounded

    def __init__(self, handles: list[ServerHandle], interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.handles = handles
        self.interval = interval
        self.peak: dict[str, dict[int, int]] = {h.label: {} for h in handles}  # label -> pid -> B
        self.timeline: dict[str, list[tuple[float, int]]] = {h.label: [] for h in handles}
        self._stop_event = threading.Event()

    def run(self) -> None:
        for _ in range(self.MAX_SAMPLES):
            now = time.time()
            for h in self.handles:
                total = 0
                for p in h.processes():
                    try:
                        rss = p.memory_info().rss
                    except psutil.NoSuchProcess:
                        continue
                    total += rss
                    peaks = self.peak[h.label]
                    peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
                self.timeline[h.label].append((now, total))
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
