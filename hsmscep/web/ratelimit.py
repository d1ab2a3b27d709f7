"""Per-client token buckets for the admin API: failed authentications and challenge issuing.

Each worker process keeps its own buckets (a client spread over N processes gets N bursts;
the balancer keeps a keep-alive client on one). The table is bounded: past `MAX_CLIENTS`
addresses, full buckets are forgotten first, then the oldest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_CLIENTS = 10_000


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimit:
    """`burst` events at once per client, then one every `interval` seconds."""

    burst: int
    interval: float
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def retry_after(self, client: str) -> int:
        """0 while `client` may go on; else whole seconds until its next event is allowed."""
        bucket = self._refilled(client)
        if bucket is None or bucket.tokens >= 1:
            return 0
        return max(1, math.ceil((1 - bucket.tokens) * self.interval))

    def take(self, client: str) -> int:
        """Count one event of `client` if it may go on (0); else the retry_after, uncounted."""
        wait = self.retry_after(client)
        if not wait:
            self.spend(client)
        return wait

    def spend(self, client: str) -> int:
        """Count one event of `client`; the retry_after that follows it."""
        bucket = self._refilled(client)
        if bucket is None:
            self._forget()
            bucket = self._buckets[client] = _Bucket(float(self.burst), self.clock())
        bucket.tokens = max(0.0, bucket.tokens - 1)
        return self.retry_after(client)

    def _refilled(self, client: str) -> _Bucket | None:
        bucket = self._buckets.get(client)
        if bucket is not None:
            now = self.clock()
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) / self.interval)
            bucket.at = now
        return bucket

    def _forget(self) -> None:
        if len(self._buckets) < MAX_CLIENTS:
            return
        now = self.clock()
        for client, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.at) / self.interval >= self.burst:
                del self._buckets[client]  # back to a full burst: nothing to remember
        for client in list(self._buckets)[: max(0, len(self._buckets) - MAX_CLIENTS + 1)]:
            del self._buckets[client]  # insertion order: the oldest first
