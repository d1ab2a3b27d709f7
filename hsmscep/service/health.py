"""The store's health, as the issuing path last saw it: no CA signature for a certificate that
cannot be stored.

Once storing a certificate fails (a full or read-only disk, a broken database), enrollments
are answered 503 before any HSM work; once per `PROBE_SECONDS` a request first makes the store
take a small write (Store.probe) and goes on only if it succeeded: after the failure that
revealed it, an outage costs no CA signature. Per CA and process; nothing here awaits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from hsmscep.errors import StoreError

log = logging.getLogger(__name__)

PROBE_SECONDS = 2.0


class StoreHealth:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._down_since: float | None = None
        self._next_probe = 0.0
        self._refused = 0

    @property
    def down(self) -> bool:
        """Storing failed and no probe or certificate has succeeded since."""
        return self._down_since is not None

    def check(self) -> None:
        """Raise StoreError (503) while the store is down, except when a probe is due."""
        if self._down_since is None:
            return
        now = self._clock()
        if now < self._next_probe:
            self._refused += 1
            raise StoreError("certificate store unavailable")
        self._next_probe = now + PROBE_SECONDS  # this request probes the store first

    def failed(self) -> None:
        """Storing a certificate failed."""
        if self._down_since is None:
            self._down_since = self._clock()
            log.error("certificate store failing: enrollments get 503 until it recovers")
        self._next_probe = self._clock() + PROBE_SECONDS

    def stored(self) -> None:
        """A certificate was stored."""
        if self._down_since is not None:
            log.warning(
                "certificate store recovered after %.0f s (%d requests refused meanwhile)",
                self._clock() - self._down_since,
                self._refused,
            )
            self._down_since, self._refused = None, 0
