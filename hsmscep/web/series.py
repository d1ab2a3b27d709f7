"""The Prometheus series hsmscep exports (docs/operations.md#metrics lists them) and the
spelling of their label values. Recorded through web/metrics.py only.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from hsmscep.protocol.codes import FailInfo, MessageType

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
POOL_THREADS = Gauge(
    "hsmscep_pool_threads",
    "Signing worker threads (HSM sessions), all processes: the default pool grows at run "
    "time for a slow HSM (sampled every few seconds).",
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
ENROLLING = frozenset({"PKCSReq", "RenewalReq"})
ENROLLMENT_OUTCOMES = {"success": "issued", "pending": "pending", "failure": "refused"}
