"""SIGHUP to `hsmscep serve`, with 1 and with 2 workers: a graceful restart of the workers
after the configuration passed pre-flight again; a broken configuration keeps the old ones."""

from __future__ import annotations

import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from hsmscep.config.settings import load_settings
from tests.conftest import DevCa, Server, make_ca, start_server
from tests.test_pipeline import worker_pids


@pytest.fixture(scope="module")
def hup_ca(softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DevCa:
    return make_ca(softhsm_dir, tmp_path_factory.mktemp("hup"), "hsmscep-hup")


def copy_of(ca: DevCa, directory: Path) -> DevCa:
    for name in ("pin", "challenge", "ca.pem", "ra.pem", "hsmscep.toml"):
        shutil.copy(ca.directory / name, directory / name)
    config = directory / "hsmscep.toml"
    return DevCa(directory, config, load_settings(config), ca.challenge, ca.token)


def wait_for(predicate: object, what: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def healthy(server: Server) -> bool:
    with urllib.request.urlopen(f"{server.url}/healthz", timeout=5) as response:
        return bool(response.status == 200)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_restarts_the_workers_gracefully(
    hup_ca: DevCa, tmp_path: Path, workers: int
) -> None:
    ca = copy_of(hup_ca, tmp_path)
    server = start_server(ca, args=("--workers", str(workers)))
    try:
        wait_for(lambda: len(worker_pids(server.process.pid)) == workers, "the workers")
        before = set(worker_pids(server.process.pid))
        server.process.send_signal(signal.SIGHUP)

        def replaced() -> bool:
            now = set(worker_pids(server.process.pid))
            return len(now) == workers and not now & before

        wait_for(replaced, "new workers")
        assert server.process.poll() is None and healthy(server)
        assert "configuration checked; restarting the workers" in server.output()

        # A broken configuration: no restart, the running workers keep serving.
        running = set(worker_pids(server.process.pid))
        ca.config.write_text(ca.config.read_text() + "\n[stroe]\npath = 'x.db'\n")
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "not restarting the workers" in server.output(), "the refusal")
        assert "unknown section [stroe]" in server.output()
        assert set(worker_pids(server.process.pid)) == running and healthy(server)
    finally:
        code = server.stop()
    assert code == 0, server.output()
