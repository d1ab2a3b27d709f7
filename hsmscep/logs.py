"""Logging set-up, the same in the CLI and in every server worker process.

uvicorn starts its worker processes with `spawn`: they run none of the CLI's set-up, so
without this the audit lines and warnings of every worker but a lone one would be lost.
"""

from __future__ import annotations

import logging
import threading
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure(level: str | int = logging.INFO) -> None:
    """Log to stderr in FORMAT (once per process), hsmscep's loggers at `level`."""
    logging.basicConfig(level=logging.INFO, format=FORMAT)
    logging.getLogger("hsmscep").setLevel(level)


class Throttled:
    """At most one line per `interval` seconds per key; the next line counts what was held
    back. For faults that repeat on every request (a full disk answered 37,704 lines in 75 s)."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger, self._interval = logger, interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log `msg % args` unless `key` was logged less than `interval` ago; True if logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            msg += " (%d more like it in the last %.0f s)"
            args = (*args, held, self._interval if last is None else now - last)
        self._logger.log(level, msg, *args)
        return True
