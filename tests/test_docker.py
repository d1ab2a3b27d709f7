"""docker/: the entrypoint's choices (run with a stand-in `hsmscep` on PATH, as no Docker
engine runs here) and the Dockerfile's promises, read from the file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def _entrypoint(
    tmp_path: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "hsmscep"
    # Records the command line the entrypoint execs, so the test sees which branch it took.
    stand_in.write_text('#!/bin/sh\necho "hsmscep $*"\n')
    stand_in.chmod(0o755)
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serves_the_mounted_config(tmp_path: Path) -> None:
    config = tmp_path / "hsmscep.toml"
    config.write_text("")
    run = _entrypoint(tmp_path, {"HSMSCEP_CONFIG": str(config)}, "--workers", "2")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"hsmscep serve --config {config} --host 0.0.0.0 --workers 2"


def test_no_config_is_an_error_not_a_dev_ca(tmp_path: Path) -> None:
    run = _entrypoint(tmp_path, {"HSMSCEP_CONFIG": str(tmp_path / "absent.toml")})
    assert run.returncode == 2
    assert run.stdout == ""  # nothing was started
    assert "no configuration at" in run.stderr and "HSMSCEP_DEV=1" in run.stderr


def test_a_directory_as_config_is_an_error(tmp_path: Path) -> None:
    run = _entrypoint(tmp_path, {"HSMSCEP_CONFIG": str(tmp_path)})
    assert run.returncode == 2 and run.stdout == ""
    assert "is not a readable file" in run.stderr


def test_dev_ca_only_when_asked_and_loudly(tmp_path: Path) -> None:
    env = {"HSMSCEP_CONFIG": str(tmp_path / "absent.toml"), "HSMSCEP_DEV": "1"}
    run = _entrypoint(tmp_path, env)
    assert run.returncode == 0
    assert run.stdout.strip() == "hsmscep dev --dir /data/dev --host 0.0.0.0"
    assert "WARNING" in run.stderr and "THROW-AWAY" in run.stderr


@pytest.mark.skipif(shutil.which("dash") is None, reason="dash not installed")
def test_entrypoint_is_posix_sh() -> None:
    # python:*-slim images run /bin/sh = dash: no bashisms.
    subprocess.run(["dash", "-n", str(ENTRYPOINT)], check=True, timeout=30)


def test_dockerfile_installs_from_the_lock() -> None:
    assert "--require-hashes -r requirements/runtime.txt" in DOCKERFILE
    # The package itself never pulls unlocked dependencies.
    assert re.search(r"pip wheel [^\n]*--no-deps \.", DOCKERFILE)
    assert "--no-index --find-links /wheels" in DOCKERFILE


def test_runtime_image_has_no_compilers_or_softhsm_by_default() -> None:
    runtime = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    assert "build-essential" not in runtime
    softhsm = re.search(r'if \[ "\$WITH_SOFTHSM" = "true" \]; then(.*?)fi', runtime, re.S)
    assert softhsm is not None and "softhsm2" in softhsm.group(1)
    assert "softhsm2" not in runtime.replace(softhsm.group(0), "")
    assert "ARG WITH_SOFTHSM=false" in runtime


def test_runtime_image_health_volume_user() -> None:
    runtime = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    # /readyz: a 503 (token gone, store not writable, CRL or CA expired) fails the check,
    # since urlopen raises on it and python exits non-zero.
    assert re.search(r"^HEALTHCHECK .*\n.*urlopen\(.*/readyz", runtime, re.M)
    assert 'VOLUME ["/data"]' in runtime
    assert re.search(r"^USER hsmscep$", runtime, re.M)
