"""Destructive commands ask first and name what they delete; init and rollover print each
step as it completes, and after a failure the command that resumes (without --force)."""

from __future__ import annotations

import os
import pty
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hsmscep.cli.dev import dev_config
from hsmscep.hsm import devtoken
from tests.conftest import DevCa, make_ca


def cli(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmscep", *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def doomed_ca(softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DevCa:
    return make_ca(softhsm_dir, tmp_path_factory.mktemp("doomed"), "hsmscep-doomed")


def keys_intact(ca: DevCa, cert_before: bytes) -> None:
    assert (ca.directory / "ca.pem").read_bytes() == cert_before
    check = cli("config", "check", "--config", str(ca.config))
    assert check.returncode == 0 and "CA key label='hsmscep-ca': found" in check.stdout


def test_init_force_without_a_terminal_refuses_without_yes(doomed_ca: DevCa) -> None:
    before = (doomed_ca.directory / "ca.pem").read_bytes()
    result = cli("init", "--config", str(doomed_ca.config), "--force")
    assert result.returncode == 2
    assert "label='hsmscep-ca'" in result.stderr and "label='hsmscep-ra'" in result.stderr
    assert "--yes" in result.stderr and "nothing was changed" in result.stderr
    keys_intact(doomed_ca, before)


def test_init_force_on_a_terminal_asks_and_a_no_keeps_the_keys(doomed_ca: DevCa) -> None:
    before = (doomed_ca.directory / "ca.pem").read_bytes()
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"no\n")
        result = cli("init", "--config", str(doomed_ca.config), "--force", stdin=terminal)
    finally:
        os.close(controller)
        os.close(terminal)
    assert result.returncode == 2
    assert "destroys these keys in the HSM" in result.stderr and "'hsmscep-ca'" in result.stderr
    assert "not confirmed" in result.stderr
    keys_intact(doomed_ca, before)


def test_init_force_yes_names_and_replaces_the_keys(doomed_ca: DevCa) -> None:
    before = (doomed_ca.directory / "ca.pem").read_bytes()
    result = cli("init", "--config", str(doomed_ca.config), "--force", "--yes")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [f"destroyed old key label='hsmscep-{role}'" for role in ("ca", "ra")]
    assert any(line.startswith("generated CA key") for line in lines)
    assert (doomed_ca.directory / "ca.pem").read_bytes() != before


def test_a_failed_init_says_what_exists_and_resumes(softhsm_dir: Path, tmp_path: Path) -> None:
    token = devtoken.ensure_token(softhsm_dir, label="hsmscep-resume")
    (tmp_path / "pin").write_bytes(token.pin_file.read_bytes())
    (tmp_path / "challenge").write_text("secret-resume\n")
    (tmp_path / "blocker").write_text("a file where a directory should be\n")
    config = tmp_path / "hsmscep.toml"
    good = dev_config(token.module, token.label, "pin", "challenge")
    config.write_text(good.replace('cert = "ca.pem"', 'cert = "blocker/ca.pem"'))

    failed = cli("init", "--config", str(config), "--subject", "CN=resume test")
    assert failed.returncode == 1
    assert failed.stdout.splitlines()[:2] == [
        "generated CA key label='hsmscep-ca' (rsa2048)",
        "generated RA both key label='hsmscep-ra' (rsa2048)",
    ]
    notes = [line for line in failed.stderr.splitlines() if "resume with: " in line]
    assert len(notes) == 1 and "Traceback" not in failed.stderr
    resume = shlex.split(notes[0].split("resume with: ", 1)[1])
    assert resume[:2] == ["hsmscep", "init"] and "--resume" in resume and "--force" not in resume
    assert "CN=resume test" in resume

    config.write_text(good)
    resumed = cli(*resume[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[0].startswith("kept existing keys label='hsmscep-ca'")
    assert "wrote self-signed CA certificate" in resumed.stdout
    assert (tmp_path / "ca.pem").exists() and (tmp_path / "ra.pem").exists()

    again = cli(*resume[1:])  # resuming a finished init keeps everything
    assert again.returncode == 0 and "kept CA certificate" in again.stdout


def test_rollover_prepare_force_asks_and_names_the_leftover_keys(
    softhsm_dir: Path, tmp_path: Path
) -> None:
    ca = make_ca(softhsm_dir, tmp_path / "ca", "hsmscep-roll-force")
    csr = str(tmp_path / "next.csr")
    first = cli("rollover", "prepare", "--config", str(ca.config), "--csr", csr)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == "generated next CA key label='hsmscep-ca-g2' (rsa2048)"

    refused = cli("rollover", "prepare", "--config", str(ca.config), "--csr", csr, "--force")
    assert refused.returncode == 2
    assert "label='hsmscep-ca-g2'" in refused.stderr and "label='hsmscep-ra-g2'" in refused.stderr
    assert "--yes" in refused.stderr and refused.stdout == ""

    confirmed = cli(
        *("rollover", "prepare", "--config", str(ca.config), "--csr", csr, "--force", "--yes")
    )
    assert confirmed.returncode == 0, confirmed.stderr
    assert confirmed.stdout.splitlines()[:2] == [
        f"destroyed leftover key label='hsmscep-{role}-g2'" for role in ("ca", "ra")
    ]
