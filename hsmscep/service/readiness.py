"""Readiness of one CA in this process: the store takes a write, the CRL is current, the CA and
RA certificates are valid. /readyz adds the HSM tokens (web/app.py).

The store check is a real write (Store.probe), so its answer is kept for CACHE_SECONDS and
shared by concurrent callers: a scraper polling /readyz costs the store at most one small
write per process and interval, and a hung store costs a caller TIMEOUT_SECONDS at most.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime

from cryptography import x509

from hsmscep.errors import StoreError
from hsmscep.service.ports import Store

OK = "ok"
CACHE_SECONDS = 2.0
TIMEOUT_SECONDS = 2.0


class Readiness:
    """The checks of one CA: each answers "ok" or a short reason."""

    def __init__(
        self,
        store: Store,
        certs: dict[str, x509.Certificate],
        clock: Callable[[], datetime],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`certs`: what must be valid, by role ("CA", "RA")."""
        self._store, self._certs, self._clock, self._monotonic = store, certs, clock, monotonic
        self._cached: tuple[float, str, str] | None = None  # (when, store, crl)
        self._running: asyncio.Task[tuple[str, str]] | None = None

    async def checks(self) -> dict[str, str]:
        """{"store", "crl", "ca"}: "ok" or why not."""
        store, crl = await self._store_checks()
        return {"store": store, "crl": crl, "ca": self.certificates()}

    def certificates(self) -> str:
        """ "ok" while every certificate is within its validity period."""
        now = self._clock()
        problems = []
        for role, cert in self._certs.items():
            if now > cert.not_valid_after_utc:
                problems.append(f"{role} certificate expired {_iso(cert.not_valid_after_utc)}")
            elif now < cert.not_valid_before_utc:
                problems.append(
                    f"{role} certificate not valid before {_iso(cert.not_valid_before_utc)}"
                )
        return "; ".join(problems) or OK

    async def _store_checks(self) -> tuple[str, str]:
        now = self._monotonic()
        if self._cached is not None and now - self._cached[0] < CACHE_SECONDS:
            return self._cached[1], self._cached[2]
        # One probe at a time: callers arriving meanwhile wait for it (bounded) instead of
        # writing again; a probe that outlives the timeout keeps running and is reused.
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._probe(), name="hsmscep-readiness")
        try:
            store, crl = await asyncio.wait_for(asyncio.shield(self._running), TIMEOUT_SECONDS)
        except TimeoutError:
            store, crl = f"no answer within {TIMEOUT_SECONDS:.0f} s", "unknown: store not answering"
        self._cached = (self._monotonic(), store, crl)
        return store, crl

    async def _probe(self) -> tuple[str, str]:
        try:
            await self._store.probe()
            store = OK
        except StoreError as exc:
            store = f"not writable: {exc}"
        try:
            status = await self._store.crl_status()
        except StoreError as exc:
            return store, f"unknown: {exc}"
        latest = status.latest
        if latest is None:
            return store, "no CRL published yet"
        if self._clock() > latest.next_update:
            return store, f"CRL {latest.number} past nextUpdate {_iso(latest.next_update)}"
        return store, OK


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
