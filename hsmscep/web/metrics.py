"""Prometheus metrics: the series (docs/operations.md#metrics) and the one recorder of them.

prometheus-client runs in its multiprocess mode under `hsmscep serve` (web/scrape.py sets the
directory up before any worker exists), so each process writes its own values to mmap'd files
and a scrape of any worker sums them. In one process without that directory (in-process tests)
the same series live in the default registry.

The hot path pays a dictionary lookup per series: label children are resolved once and kept
(`.labels()` takes a lock and builds a key), and gauges that describe a state (pool depth,
tokens, CRL, pending requests) are sampled every few seconds instead of being moved per job.
Label values are names from the configuration or fixed words, never anything a client sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import metadata

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from hsmscep.protocol.codes import FailInfo, MessageType
from hsmscep.service.replies import Outcome

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created: noise

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_HSM = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "hsmscep_requests",
    "SCEP HTTP requests by message type, profile and outcome (success, pending, failure with"
    " its failInfo, http_error with its status, overloaded).",
    ["message_type", "profile", "outcome", "fail_info", "status"],
)
ENROLLMENTS = Counter(
    "hsmscep_enrollments",
    "PKCSReq and RenewalReq results by CA and profile: issued, pending or refused.",
    ["ca", "profile", "outcome"],
)
REQUEST_SECONDS = Histogram(
    "hsmscep_request_duration_seconds",
    "End-to-end latency of SCEP requests in the server, by message type.",
    ["message_type"],
    buckets=_LATENCY,
)
QUEUE_SECONDS = Histogram(
    "hsmscep_hsm_queue_seconds",
    "Time a job waited in the signing pool's queue for a signing worker.",
    buckets=_HSM,
)
HSM_SECONDS = Histogram(
    "hsmscep_hsm_operation_seconds",
    "Latency of private-key operations in the HSM, by operation and token.",
    ["operation", "token"],
    buckets=_HSM,
)
IN_FLIGHT = Gauge(
    "hsmscep_pool_in_flight",
    "Signing jobs admitted and not finished (sampled every few seconds).",
    multiprocess_mode="livesum",
)
QUEUE_DEPTH = Gauge(
    "hsmscep_pool_queue_depth",
    "Signing jobs waiting for a signing worker (sampled every few seconds).",
    multiprocess_mode="livesum",
)
REJECTIONS = Counter(
    "hsmscep_pool_rejections",
    "Signing jobs refused at admission because the queue was full (answered 503).",
)
TOKEN_UP = Gauge(
    "hsmscep_hsm_token_up",
    "1 while the token is logged in and answering in some live worker process, else 0.",
    ["token"],
    multiprocess_mode="livemax",
)
BATCH_SIZE = Histogram(
    "hsmscep_store_commit_batch_size",
    "Certificate rows written per group commit.",
    buckets=_BATCH,
)
COMMIT_SECONDS = Histogram(
    "hsmscep_store_commit_seconds",
    "Latency of one group commit (write and COMMIT of a batch).",
    buckets=_HSM,
)
STORE_ERRORS = Counter(
    "hsmscep_store_errors",
    "Store failures by operation: commit (a group commit failed), request (a SCEP request"
    " answered 503 for the store), crl, pending.",
    ["operation"],
)
CHALLENGES = Counter(
    "hsmscep_challenges",
    "One-time challenges by event: issued, consumed, expired, refused.",
    ["event"],
)
PENDING = Gauge(
    "hsmscep_pending_requests",
    "Requests held for manual approval and waiting for a decision, by CA.",
    ["ca"],
    multiprocess_mode="livemostrecent",
)
WEBHOOK_CALLS = Counter(
    "hsmscep_webhook_calls",
    "Authorization webhook calls by result: allowed, denied, error, timeout.",
    ["result"],
)
WEBHOOK_SECONDS = Histogram(
    "hsmscep_webhook_seconds",
    "Latency of authorization webhook calls.",
    buckets=_LATENCY,
)
CRL_NUMBER = Gauge(
    "hsmscep_crl_number",
    "CRL number of the CA's current CRL.",
    ["ca"],
    multiprocess_mode="livemax",
)
CRL_THIS_UPDATE = Gauge(
    "hsmscep_crl_this_update_timestamp_seconds",
    "thisUpdate of the CA's current CRL as a Unix time (its age: time() - this value).",
    ["ca"],
    multiprocess_mode="livemax",
)
CRL_NEXT_UPDATE = Gauge(
    "hsmscep_crl_next_update_timestamp_seconds",
    "nextUpdate of the CA's current CRL as a Unix time.",
    ["ca"],
    multiprocess_mode="livemax",
)
NOT_AFTER = Gauge(
    "hsmscep_certificate_not_after_timestamp_seconds",
    "notAfter of the CA and RA certificates as a Unix time, by CA and role (ca, ra,"
    " ra_decrypt, next_ca).",
    ["ca", "role"],
    multiprocess_mode="livemax",
)
BUILD_INFO = Gauge(
    "hsmscep_build_info",
    "Always 1: the hsmscep, python-pkcs11 and cryptography versions and the PKCS#11 module.",
    ["version", "python_pkcs11", "cryptography", "module"],
    multiprocess_mode="livemax",
)

MESSAGE_TYPES: dict[str, str] = {
    MessageType.PKCS_REQ: "PKCSReq",
    MessageType.RENEWAL_REQ: "RenewalReq",
    MessageType.CERT_POLL: "CertPoll",
    MessageType.GET_CERT: "GetCert",
    MessageType.GET_CRL: "GetCRL",
}
OPERATIONS = frozenset({"GetCACert", "GetCACaps", "GetNextCACert"})
FAIL_INFOS = {
    FailInfo.BAD_ALG: "badAlg",
    FailInfo.BAD_MESSAGE_CHECK: "badMessageCheck",
    FailInfo.BAD_REQUEST: "badRequest",
    FailInfo.BAD_TIME: "badTime",
    FailInfo.BAD_CERT_ID: "badCertId",
}
_ENROLLING = ("PKCSReq", "RenewalReq")
_ENROLLMENT = {"success": "issued", "pending": "pending", "failure": "refused"}

# A child's methods, looked up once: (increment, observe) per label set.
Inc = Callable[[], None]
Observe = Callable[[float], None]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


class Metrics:
    """Records the series of one app; each label set's child is resolved on first use."""

    enabled = True

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, str, str, str], Inc] = {}
        self._enrollments: dict[tuple[str, str, str], Inc] = {}
        self._latency: dict[str, Observe] = {}
        self._hsm: dict[tuple[str, str], Observe] = {}
        self.hsm_wait: Observe = QUEUE_SECONDS.observe
        self.rejected: Inc = REJECTIONS.inc

    def answered(self, kind: str, profile: str, outcome: str, fail: str, status: str) -> None:
        """One SCEP request answered: `kind` a message type or operation name."""
        key = (kind, profile, outcome, fail, status)
        inc = self._requests.get(key)
        if inc is None:
            inc = self._requests[key] = REQUESTS.labels(*key).inc
        inc()

    def pki(self, kind: str, profile: str, ca: str, answer: Outcome) -> None:
        """A PKIOperation answered with a signed CertRep."""
        fail = answer.fail_info
        outcome = "failure" if fail is not None else "pending" if answer.pending else "success"
        self.answered(kind, profile, outcome, "" if fail is None else FAIL_INFOS[fail], "200")
        if kind in _ENROLLING:
            key = (ca, profile, _ENROLLMENT[outcome])
            inc = self._enrollments.get(key)
            if inc is None:
                inc = self._enrollments[key] = ENROLLMENTS.labels(*key).inc
            inc()

    def latency(self, kind: str, started: float) -> None:
        observe = self._latency.get(kind)
        if observe is None:
            observe = self._latency[kind] = REQUEST_SECONDS.labels(kind).observe
        observe(time.perf_counter() - started)

    def hsm_operation(self, operation: str, token: str) -> Observe:
        """The observer of one HSM operation's seconds (resolved once per key and worker)."""
        key = (operation, token)
        observe = self._hsm.get(key)
        if observe is None:
            observe = self._hsm[key] = HSM_SECONDS.labels(operation, token).observe
        return observe

    @staticmethod
    def commit(size: int, seconds: float, failed: bool) -> None:
        """One group commit (called on the commit thread)."""
        BATCH_SIZE.observe(size)
        COMMIT_SECONDS.observe(seconds)
        if failed:
            STORE_ERRORS.labels("commit").inc()

    @staticmethod
    def store_error(operation: str) -> None:
        STORE_ERRORS.labels(operation).inc()

    @staticmethod
    def challenge(event: str) -> None:
        CHALLENGES.labels(event).inc()

    @staticmethod
    def webhook(result: str, seconds: float) -> None:
        WEBHOOK_CALLS.labels(result).inc()
        WEBHOOK_SECONDS.observe(seconds)

    @staticmethod
    def build_info(module: str) -> None:
        versions = (_version("hsmscep"), _version("python-pkcs11"), _version("cryptography"))
        BUILD_INFO.labels(*versions, module).set(1)


class NoMetrics(Metrics):
    """[metrics] enabled = false: nothing recorded."""

    enabled = False

    def __init__(self) -> None:
        super().__init__()
        self.hsm_wait = _ignore
        self.rejected = _nothing

    def answered(self, kind: str, profile: str, outcome: str, fail: str, status: str) -> None:
        pass

    def pki(self, kind: str, profile: str, ca: str, answer: Outcome) -> None:
        pass

    def latency(self, kind: str, started: float) -> None:
        pass

    def hsm_operation(self, operation: str, token: str) -> Observe:
        return _ignore

    @staticmethod
    def commit(size: int, seconds: float, failed: bool) -> None:
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


def _nothing() -> None:
    pass
