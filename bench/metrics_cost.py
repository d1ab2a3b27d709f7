"""CPU the metrics add to one enrollment (issue 12: the hot path must pay nothing measurable).

Replays what the server records for one PKCSReq with a static challenge, in prometheus-client's
multiprocess mode as `hsmscep serve` runs it (values in mmap'd files): the request counter and
the enrollment counter, the latency histogram, one pool job's queue wait, three HSM operations
(decrypt, sign_certificate, sign_reply) with their clock reads, one group commit (the worst
case: a batch of one), and a share of the once-a-second flush into prometheus-client. The same
sequence against the disabled recorder is the baseline.
Process CPU time per enrollment, best of several rounds; the 2-core box is shared, so the
minimum is the number to read.

    python -m bench.metrics_cost [--rounds 7] [--n 20000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

_DIR = tempfile.mkdtemp(prefix="hsmscep-metrics-bench-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _DIR  # before prometheus_client is imported

from hsmscep.protocol.codes import MessageType  # noqa: E402
from hsmscep.service.replies import Outcome  # noqa: E402
from hsmscep.web.metrics import Metrics, NoMetrics, Observe  # noqa: E402
from hsmscep.web.series import MESSAGE_TYPES  # noqa: E402

FLUSH_EVERY = 1000
TOKEN = "token label='hsmscep' in /usr/lib/softhsm/libsofthsm2.so"


def enrollment(metrics: Metrics, outcome: Outcome, wait: Observe, ops: list[Observe]) -> None:
    """What one enrollment records, in the order the server does."""
    started = time.perf_counter()  # web/scep.py
    queued_at = time.perf_counter()  # hsm/pool.py run()
    wait(time.perf_counter() - queued_at)  # the worker takes the job
    for observe in ops:  # hsm/keyring.py: three private-key operations
        t0 = time.perf_counter()
        observe(time.perf_counter() - t0)
    t0 = time.perf_counter()  # store/groupcommit.py, a batch of one
    metrics.commit(1, time.perf_counter() - t0, False)
    kind = MESSAGE_TYPES.get(MessageType.PKCS_REQ, "unknown")
    metrics.pki(kind, "default", "default", outcome)
    metrics.latency(kind, started)


def per_enrollment(metrics: Metrics, n: int) -> float:
    """CPU microseconds per enrollment's recording."""
    outcome = Outcome(response=b"", record=None, reason="issued")
    ops = [metrics.hsm_operation(op, TOKEN) for op in ("decrypt", "sign_certificate", "sign_reply")]
    wait = metrics.wait_observer()
    enrollment(metrics, outcome, wait, ops)  # children resolved: the steady state
    start = time.process_time()
    for index in range(n):
        enrollment(metrics, outcome, wait, ops)
        if index % FLUSH_EVERY == 0:
            metrics.flush()  # the sampler's share: about once a second at 1,000/s
    metrics.flush()
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    try:
        on, off = Metrics(), NoMetrics()
        with_metrics, without = [], []
        for _ in range(args.rounds):  # interleaved: the box's load hits both alike
            with_metrics.append(per_enrollment(on, args.n))
            without.append(per_enrollment(off, args.n))
        best_on, best_off = min(with_metrics), min(without)
        print(f"metrics on:  {best_on:.2f} us CPU per enrollment (best of {args.rounds})")
        print(f"metrics off: {best_off:.2f} us CPU per enrollment")
        print(f"cost:        {best_on - best_off:.2f} us per enrollment")
    finally:
        shutil.rmtree(_DIR, ignore_errors=True)


if __name__ == "__main__":
    main()
