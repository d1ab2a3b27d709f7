"""Worker processes die with their supervisor.

A worker whose supervisor was killed (kill -9, OOM killer) would keep the listening socket and
serve on unsupervised, so a restart fails with "Address already in use". Each worker asks the
kernel for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG, Linux), which starts
uvicorn's graceful shutdown, and a watchdog thread notices the new parent too (other systems,
or a parent thread that exited) and ends the process `GRACE` seconds later whatever is still
in flight: SQLite's WAL and the HSM survive an abrupt exit, a client retries.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
POLL = 0.1  # seconds between looks at the parent
GRACE = 0.8  # seconds from noticing to exit: the whole within a second of the parent's death


def exit_with_parent(parent: int) -> None:
    """Make this process end within about a second once `parent` (its supervisor) is gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass
    threading.Thread(target=_watch, args=(parent,), name="orphan-watchdog", daemon=True).start()


def _watch(parent: int) -> None:
    # The parent may already be gone before prctl ran: then getppid() differs at once.
    while os.getppid() == parent:
        time.sleep(POLL)
    log.error("supervisor %d is gone: this worker exits", parent)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE)
    os._exit(1)
