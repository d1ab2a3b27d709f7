"""Process faults: the workers of a supervisor killed with kill -9 exit on their own, and a
server restarted on the same port right after comes up (live server, real SoftHSM2 token)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tests.conftest import DevCa, free_port
from tests.test_pipeline import worker_pids

pytestmark = pytest.mark.hsm


def serve(
    ca: DevCa,
    port: int,
    log: Path,
    env: Mapping[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """`hsmscep serve` (2 workers unless `env` says otherwise) on `port`, once /healthz
    answers (bounded: 60 s); `preexec` runs in the child before it starts."""
    command = [sys.executable, "-m", "hsmscep", "serve", "--config", str(ca.config)]
    full_env = dict(os.environ) | {"HSMSCEP_SERVER_WORKERS": "2"} | dict(env or {})
    with log.open("ab") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ca.directory,
            preexec_fn=preexec,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"server did not come up:\n{log.read_text(errors='replace')}")


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_workers_exit_with_a_killed_supervisor_and_a_restart_succeeds(
    dev_ca: DevCa, tmp_path: Path
) -> None:
    port, log = free_port(), tmp_path / "orphans.log"
    first = serve(dev_ca, port, log)
    workers = worker_pids(first.pid)
    assert len(workers) == 2
    first.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    first.wait(timeout=10)
    # Bounded wait, no timing assertion: the second is the design (web/orphans.py).
    deadline = killed + 15
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    print(f"workers gone {time.monotonic() - killed:.2f} s after the supervisor's kill -9")
    left = [pid for pid in workers if alive(pid)]
    for pid in left:  # never leave them behind for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived their supervisor"
    second = serve(dev_ca, port, log)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/scep?operation=GetCACaps") as r:
            assert r.status == 200 and b"POSTPKIOperation" in r.read()
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert "Address already in use" not in log.read_text(errors="replace")
    assert "supervisor" in log.read_text(errors="replace")  # the workers said why they left
