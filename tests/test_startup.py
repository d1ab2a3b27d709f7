"""Start-up mistakes: one line, the class's exit code, no traceback, with 1 and 2 workers.

Each case runs `hsmscep serve` as an operator would and breaks one thing. Pre-flight in the
parent must catch it before uvicorn starts any worker.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import DevCa, free_port, make_ca


@pytest.fixture(scope="module")
def startup_ca(softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DevCa:
    # Its own token: wrong PINs are tried against it, never against the shared one.
    return make_ca(softhsm_dir, tmp_path_factory.mktemp("startup"), "hsmscep-startup")


def variant(ca: DevCa, directory: Path, replace: dict[str, str], extra: str = "") -> Path:
    """A copy of `ca`'s config in `directory` with `replace` applied (each must match)."""
    for name in ("pin", "challenge", "ca.pem", "ra.pem"):
        shutil.copy(ca.directory / name, directory / name)
    text = ca.config.read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    config = directory / "hsmscep.toml"
    config.write_text(text + extra)
    return config


def serve(
    config: Path, *args: str, port: int | None = None, debug: bool = False
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hsmscep", *(["--debug"] if debug else [])]
    command += ["serve", "--config", str(config), "--port", str(port or free_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=config.parent)


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *parts: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("hsmscep: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_wrong_pin(startup_ca: DevCa, tmp_path: Path, workers: str) -> None:
    config = variant(startup_ca, tmp_path, {})
    (tmp_path / "pin").write_text("not-the-pin\n")
    result = serve(config, "--workers", workers)
    assert_one_line(result, 3, "CKR_PIN_INCORRECT", "'hsmscep-startup'", "tried once")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_missing_token_lists_what_the_module_sees(
    startup_ca: DevCa, tmp_path: Path, workers: str
) -> None:
    config = variant(startup_ca, tmp_path, {'"hsmscep-startup"': '"no-such-token"'})
    line = assert_one_line(serve(config, "--workers", workers), 3)
    assert "no token with label 'no-such-token'" in line and "'hsmscep-startup'" in line
    assert f"SOFTHSM2_CONF: {os.environ['SOFTHSM2_CONF']}" in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_missing_certificate(startup_ca: DevCa, tmp_path: Path, workers: str) -> None:
    config = variant(startup_ca, tmp_path, {'cert = "ca.pem"': 'cert = "missing.pem"'})
    result = serve(config, "--workers", workers)
    assert_one_line(result, 2, "ca.cert", "missing.pem does not exist")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use(startup_ca: DevCa, tmp_path: Path, busy_port: int, workers: str) -> None:
    config = variant(startup_ca, tmp_path, {})
    result = serve(config, "--workers", workers, port=busy_port)
    assert_one_line(result, 5, f"127.0.0.1:{busy_port} is already in use")


def test_module_path_wrong(startup_ca: DevCa, tmp_path: Path) -> None:
    module = startup_ca.token.module
    config = variant(startup_ca, tmp_path, {f'"{module}"': '"/nonexistent/libpkcs11.so"'})
    assert_one_line(serve(config), 3, "/nonexistent/libpkcs11.so does not exist")


def test_certificate_not_pem(startup_ca: DevCa, tmp_path: Path) -> None:
    config = variant(startup_ca, tmp_path, {'cert = "ca.pem"': 'cert = "ca.der"'})
    cert = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    (tmp_path / "ca.der").write_bytes(cert.public_bytes(Encoding.DER))
    assert_one_line(serve(config), 2, "ca.der is not a PEM certificate", "openssl x509")


def test_certificate_unreadable(startup_ca: DevCa, tmp_path: Path) -> None:
    config = variant(startup_ca, tmp_path, {'cert = "ra.pem"': 'cert = "ra-locked.pem"'})
    locked = tmp_path / "ra-locked.pem"
    if os.geteuid() == 0:
        # root reads any mode: a symlink loop cannot be read by anyone.
        locked.symlink_to(locked)
    else:
        shutil.copy(tmp_path / "ra.pem", locked)
        locked.chmod(0)
    assert_one_line(serve(config), 2, "ra.cert: cannot read", "ra-locked.pem")


def test_certificate_is_a_directory(startup_ca: DevCa, tmp_path: Path) -> None:
    config = variant(startup_ca, tmp_path, {'cert = "ca.pem"': 'cert = "certs"'})
    (tmp_path / "certs").mkdir()
    assert_one_line(serve(config), 2, "ca.cert", "is a directory")


def test_store_directory_missing(startup_ca: DevCa, tmp_path: Path) -> None:
    config = variant(startup_ca, tmp_path, {'path = "hsmscep.db"': 'path = "data/hsmscep.db"'})
    assert_one_line(serve(config), 4, "store.path", "data does not exist")


def test_store_directory_read_only(startup_ca: DevCa, tmp_path: Path) -> None:
    config = variant(startup_ca, tmp_path, {'path = "hsmscep.db"': 'path = "ro/hsmscep.db"'})
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if os.geteuid() == 0:
        # root writes into any mode: the immutable attribute stops root too.
        if subprocess.run(["chattr", "+i", str(read_only)], capture_output=True).returncode:
            pytest.skip("chattr +i is not supported here")
    else:
        read_only.chmod(0o555)
    try:
        assert_one_line(serve(config), 4, "store.path", "is not writable")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(read_only)], check=True)
        read_only.chmod(0o755)


def test_bad_log_level(startup_ca: DevCa, tmp_path: Path) -> None:
    config = variant(startup_ca, tmp_path, {}, '\n[log]\nlevel = "LOUD"\n')
    assert_one_line(serve(config), 2, "log.level has value 'LOUD'", "DEBUG, INFO")


def test_address_not_resolvable(startup_ca: DevCa, tmp_path: Path) -> None:
    config = variant(startup_ca, tmp_path, {})
    result = serve(config, "--host", "no-such-host.invalid")
    assert_one_line(result, 5, "server.host 'no-such-host.invalid' does not resolve")


def test_debug_keeps_the_traceback(startup_ca: DevCa, tmp_path: Path) -> None:
    config = variant(startup_ca, tmp_path, {'cert = "ca.pem"': 'cert = "missing.pem"'})
    result = serve(config, debug=True)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_a_certificate_of_another_key(startup_ca: DevCa, tmp_path: Path) -> None:
    config = variant(startup_ca, tmp_path, {'cert = "ra.pem"': 'cert = "ca.pem"'})
    line = assert_one_line(serve(config, "--workers", "2"), 2)
    assert "ca.pem does not certify the RA key label='hsmscep-ra'" in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_worker_failing_after_pre_flight_stops_the_server(
    startup_ca: DevCa, tmp_path: Path, workers: str
) -> None:
    # A store from a newer hsmscep passes pre-flight (it opens); the worker's migration refuses.
    config = variant(startup_ca, tmp_path, {})
    with sqlite3.connect(tmp_path / "hsmscep.db") as db:
        db.execute("PRAGMA user_version = 999")
    result = serve(config, "--workers", workers)
    assert result.returncode == 6
    assert result.stderr.splitlines()[-1] == (
        "hsmscep: a worker process failed to start; its log is above"
    )
    assert "schema version 999 is newer" in result.stderr


SPY = Path("/usr/lib/x86_64-linux-gnu/pkcs11-spy.so")  # OpenSC's logging pass-through module


@pytest.mark.parametrize(
    "command", [("serve", "--workers", "1"), ("serve", "--workers", "2"), ("config", "check")]
)
def test_a_wrong_pin_is_tried_exactly_once(
    startup_ca: DevCa, tmp_path: Path, command: tuple[str, ...]
) -> None:
    if not SPY.is_file():
        pytest.skip(f"{SPY} is absent (apt-get install opensc)")
    module = startup_ca.token.module
    config = variant(startup_ca, tmp_path, {f'"{module}"': f'"{SPY}"'})
    (tmp_path / "pin").write_text("not-the-pin\n")
    calls = tmp_path / "spy.log"
    args = [sys.executable, "-m", "hsmscep", *command, "--config", str(config)]
    if command[0] == "serve":
        args += ["--port", str(free_port())]
    env = dict(os.environ, PKCS11SPY=module, PKCS11SPY_OUTPUT=str(calls))
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert_one_line(result, 3, "CKR_PIN_INCORRECT")
    logins = [line for line in calls.read_text().splitlines() if line.endswith(" C_Login")]
    assert len(logins) == 1, logins
