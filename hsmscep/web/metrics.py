"""The one recorder of the metrics (the series: web/series.py): what the web layer, the signing
pool, the keyrings, the group commit, the challenges and the webhooks report.

prometheus-client runs in its multiprocess mode under `hsmscep serve` (web/scrape.py sets the
directory up before any worker exists), so each process writes its own values to mmap'd files
and a scrape of any worker sums them. In one process without that directory (in-process tests)
the same series live in the default registry.

The hot path pays an integer add per series: each label set's child is resolved once, and the
counts of the busy series are kept per recording thread (web/tally.py) and moved into
prometheus-client once a second, before this process answers a scrape, and at shutdown. A
scrape may so lag another worker's counts by up to a second; a worker killed outright loses
at most its last second. Label values are names from the configuration or fixed words, never
anything a client sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from importlib import metadata

from hsmscep.service.replies import Outcome
from hsmscep.web import series as s
from hsmscep.web.tally import Flushable, Spread, Tally

Observe = Callable[[float], None]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


class Metrics:
    """Records the series of one app. The request methods run on the event loop; the
    observers handed to the signing threads are their own (`*_observer`)."""

    enabled = True

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, str, str, str], Tally] = {}
        self._enrollments: dict[tuple[str, str, str], Tally] = {}
        self._latency: dict[str, Spread] = {}
        self._threads: dict[tuple[int, str, str], Spread] = {}
        self._flushable: list[Flushable] = []
        self._lock = threading.Lock()  # signing threads add their observers
        rejected = Tally(s.REJECTIONS)
        self._keep(rejected)
        self.rejected = rejected.inc

    def _keep(self, item: Flushable) -> None:
        with self._lock:
            self._flushable.append(item)

    def flush(self) -> None:
        """Move the counts kept since the last flush into prometheus-client (event loop)."""
        with self._lock:
            items = list(self._flushable)
        for item in items:
            item.flush()

    def answered(self, kind: str, profile: str, outcome: str, fail: str, status: str) -> None:
        """One SCEP request answered: `kind` a message type or operation name."""
        key = (kind, profile, outcome, fail, status)
        tally = self._requests.get(key)
        if tally is None:
            tally = self._requests[key] = Tally(s.REQUESTS.labels(*key))
            self._keep(tally)
        tally.inc()

    def pki(self, kind: str, profile: str, ca: str, answer: Outcome) -> None:
        """A PKIOperation answered with a signed CertRep."""
        fail = answer.fail_info
        outcome = "failure" if fail is not None else "pending" if answer.pending else "success"
        self.answered(kind, profile, outcome, "" if fail is None else s.FAIL_INFOS[fail], "200")
        if kind in s.ENROLLING:
            key = (ca, profile, s.ENROLLMENT_OUTCOMES[outcome])
            tally = self._enrollments.get(key)
            if tally is None:
                tally = self._enrollments[key] = Tally(s.ENROLLMENTS.labels(*key))
                self._keep(tally)
            tally.inc()

    def latency(self, kind: str, started: float) -> None:
        spread = self._latency.get(kind)
        if spread is None:
            spread = self._latency[kind] = Spread(s.REQUEST_SECONDS.labels(kind))
            self._keep(spread)
        spread.observe(time.perf_counter() - started)

    def _thread_spread(self, operation: str, token: str, child: object) -> Observe:
        # One per thread and label set: a keyring reopened on the same thread reuses it.
        key = (threading.get_ident(), operation, token)
        spread = self._threads.get(key)
        if spread is None:
            with self._lock:
                spread = self._threads.get(key)
                if spread is None:
                    spread = self._threads[key] = Spread(child)
                    self._flushable.append(spread)
        return spread.observe

    def wait_observer(self) -> Observe:
        """The calling signing thread's observer of its jobs' time in the queue."""
        return self._thread_spread("", "", s.QUEUE_SECONDS)

    def hsm_operation(self, operation: str, token: str) -> Observe:
        """The calling signing thread's observer of one HSM operation's seconds."""
        child = s.HSM_SECONDS.labels(operation, token)
        return self._thread_spread(operation, token, child)

    def commit(self, size: int, seconds: float, failed: bool) -> None:
        """One group commit, on its store's commit thread."""
        self._thread_spread("batch", "", s.BATCH_SIZE)(size)
        self._thread_spread("commit", "", s.COMMIT_SECONDS)(seconds)
        if failed:
            s.STORE_ERRORS.labels("commit").inc()

    @staticmethod
    def store_error(operation: str) -> None:
        s.STORE_ERRORS.labels(operation).inc()

    @staticmethod
    def challenge(event: str) -> None:
        s.CHALLENGES.labels(event).inc()

    @staticmethod
    def webhook(result: str, seconds: float) -> None:
        s.WEBHOOK_CALLS.labels(result).inc()
        s.WEBHOOK_SECONDS.observe(seconds)

    @staticmethod
    def build_info(module: str) -> None:
        versions = (_version("hsmscep"), _version("python-pkcs11"), _version("cryptography"))
        s.BUILD_INFO.labels(*versions, module).set(1)


class NoMetrics(Metrics):
    """[metrics] enabled = false: nothing recorded."""

    enabled = False

    def answered(self, kind: str, profile: str, outcome: str, fail: str, status: str) -> None:
        pass

    def pki(self, kind: str, profile: str, ca: str, answer: Outcome) -> None:
        pass

    def latency(self, kind: str, started: float) -> None:
        pass

    def wait_observer(self) -> Observe:
        return _ignore

    def hsm_operation(self, operation: str, token: str) -> Observe:
        return _ignore

    def commit(self, size: int, seconds: float, failed: bool) -> None:
        pass

    @staticmethod
    def store_error(operation: str) -> None:
        pass

    @staticmethod
    def challenge(event: str) -> None:
        pass

    @staticmethod
    def webhook(result: str, seconds: float) -> None:
        pass

    @staticmethod
    def build_info(module: str) -> None:
        pass


def _ignore(seconds: float) -> None:
    pass
