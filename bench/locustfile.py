"""Locust user that replays pre-built SCEP PKCSReq messages and records every raw response.

Building a PKCSReq costs two RSA-2048 signatures, so the driver (bench/driver.py) builds all of
them before the timed phase and this file only POSTs bytes; the responses are verified after
the phase (bench/workload.py). Self-contained on purpose (locust and the standard library only),
so the load generator spends its CPU on HTTP.

Environment:
  BENCH_REQUESTS        pickle stream of (transaction_id, der); "{index}" is replaced by the
                        locust process index (one file per process with --processes)
  BENCH_OUT             directory for responses-<index>.pkl and state-<index>.json
  BENCH_RATE_PER_USER   requests/s per user (constant throughput); 0 or unset: back to back
  BENCH_RETRY_AFTER_MAX after a 503, sleep its Retry-After capped at this many seconds, as
                        a polite client would; 0 or unset: send the next request at once

Run by hand (the driver does this for you):
  BENCH_REQUESTS=req.pkl BENCH_OUT=out locust -f bench/locustfile.py --headless \
      -u 32 -r 32 --run-time 20s --host http://127.0.0.1:8080
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import gevent
from locust import FastHttpUser, constant, constant_throughput, events, task
from locust.env import Environment
from locust.exception import StopUser

PATH = "/scep?operation=PKIOperation"
HEADERS = {"Content-Type": "application/x-pki-message"}
RATE_PER_USER = float(os.environ.get("BENCH_RATE_PER_USER") or 0)
RETRY_AFTER_MAX = float(os.environ.get("BENCH_RETRY_AFTER_MAX") or 0)
MAX_RECORDS = 10_000_000  # a bound on reads from the request file, far above any run


class _Replay:
    """One locust process's share of the requests, and where its responses go.

    gevent runs all users on one OS thread and only switches at I/O, so no locking is needed.
    """

    def __init__(self, requests: Path, out_dir: Path, index: int) -> None:
        self.index = index
        self.out_dir = out_dir
        self._requests: IO[bytes] | None = requests.open("rb")
        self._out: IO[bytes] = (out_dir / f"responses-{index}.pkl").open("wb")
        self.popped = 0  # records taken from the request file, in file order
        # A 503 means the server shed the request unprocessed: its transactionID is still
        # fresh, so it may be sent again (a real client would retry the same message too).
        self.recycled: deque[tuple[str, bytes]] = deque()
        self.exhausted_at: float | None = None
        self.closed = False

    def next(self) -> tuple[str, bytes] | None:
        if self._requests is not None and self.popped < MAX_RECORDS:
            try:
                item: tuple[str, bytes] = pickle.load(self._requests)
                self.popped += 1
                return item
            except EOFError:
                self._requests.close()
                self._requests = None
        if self.recycled:
            return self.recycled.popleft()
        if self.exhausted_at is None:
            self.exhausted_at = time.time()
        return None

    def record(self, row: tuple[Any, ...]) -> None:
        if not self.closed:
            pickle.dump(row, self._out, protocol=pickle.HIGHEST_PROTOCOL)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._out.close()
        if self._requests is not None:
            self._requests.close()
        state = {
            "popped": self.popped,
            "recycled": [txid for txid, _ in self.recycled],
            "exhausted_at": self.exhausted_at,
        }
        (self.out_dir / f"state-{self.index}.json").write_text(json.dumps(state))


_replay: _Replay | None = None


@events.test_start.add_listener
def _open(environment: Environment, **_: Any) -> None:
    global _replay
    pattern = os.environ.get("BENCH_REQUESTS")
    if not pattern or _replay is not None:
        return
    runner = environment.runner
    index = int(getattr(runner, "worker_index", 0) or 0)
    out_dir = Path(os.environ.get("BENCH_OUT") or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    _replay = _Replay(Path(pattern.replace("{index}", str(index))), out_dir, index)


@events.test_stop.add_listener
def _close(**_: Any) -> None:
    if _replay is not None:
        _replay.close()


class ScepUser(FastHttpUser):
    """POSTs one pre-built PKCSReq per task; stops when the request file is used up."""

    wait_time = constant_throughput(RATE_PER_USER) if RATE_PER_USER > 0 else constant(0)
    # Bounded: a request that takes longer than this is an error, not a hang.
    network_timeout = 60.0
    connection_timeout = 10.0

    @task
    def enroll(self) -> None:
        item = _replay.next() if _replay is not None else None
        if item is None:
            raise StopUser()
        txid, der = item
        started = time.time()
        with self.client.post(
            PATH, data=der, headers=HEADERS, name="PKIOperation", catch_response=True
        ) as resp:
            status = int(resp.status_code or 0)
            latency_ms = float(resp.request_meta["response_time"])
            retry_after = resp.headers.get("Retry-After") if resp.headers else None
            if status == 200:
                body = resp.content or b""
                error = None
                resp.success()
            else:
                body = b""
                error = repr(resp.error) if resp.error else None
                # Distinct names so locust's own table separates shedding from real errors.
                resp.request_meta["name"] = f"PKIOperation {status or 'conn-error'}"
                resp.failure(f"HTTP {status}" if status else f"connection error: {error}")
                if status == 503 and _replay is not None:
                    _replay.recycled.append(item)
        if _replay is not None:
            _replay.record((txid, status, started, latency_ms, retry_after, body, error))
        if status == 503 and RETRY_AFTER_MAX > 0:
            gevent.sleep(min(_seconds(retry_after), RETRY_AFTER_MAX))


def _seconds(retry_after: str | None) -> float:
    """Retry-After as delay-seconds (an HTTP date or garbage counts as 1 s)."""
    try:
        return max(0.0, float(retry_after or 1))
    except ValueError:
        return 1.0
