"""A Prometheus stand-in for the load phases: GET /metrics from hsmscep every few seconds.

`--scrape SECONDS` (bench.driver) runs one while each hsmscep phase runs, so the cost of
being scraped lands in the server's CPU and latency like the rest (issue 12: within 2 % at
c=32). A server without the endpoint (an older variant) answers 404: the same request, the
same comparison. Statuses are counted for the phase's record.
"""

from __future__ import annotations

import threading
from collections import Counter

import httpx


class Scraper:
    """GET `url`/metrics every `every` seconds on a thread, until stop()."""

    def __init__(self, url: str, every: float) -> None:
        self._url, self._every = f"{url}/metrics", every
        self._stop = threading.Event()
        self.statuses: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(30)
        return dict(self.statuses)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.wait(self._every):
                try:
                    self.statuses[str(client.get(self._url).status_code)] += 1
                except httpx.HTTPError as exc:
                    self.statuses[type(exc).__name__] += 1
