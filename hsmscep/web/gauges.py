"""The metrics that describe a state, sampled in each worker process instead of moved per
request: the signing pool's depth, the tokens, the CRL, pending requests, and the facts set
once (certificate expiry, build info). The series are in web/series.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping

from cryptography import x509

from hsmscep.errors import StoreError
from hsmscep.logs import Throttled
from hsmscep.service.scep import ScepService
from hsmscep.web import series as m
from hsmscep.web.metrics import Metrics

log = logging.getLogger(__name__)
_failures = Throttled(log, 300.0)

SAMPLE_SECONDS = 1.0  # flushing the counts, pool depth and tokens
STORE_EVERY = 10  # samples between reads of the store (CRL, pending requests)

Readiness = Callable[[], list[dict[str, object]]]


def certificates(ca: str, roles: Mapping[str, x509.Certificate | None]) -> None:
    """notAfter of a CA's certificates by role (ca, ra, ra_decrypt, next_ca)."""
    for role, cert in roles.items():
        if cert is not None:
            m.NOT_AFTER.labels(ca, role).set(cert.not_valid_after_utc.timestamp())


@contextlib.asynccontextmanager
async def sampling(
    metrics: Metrics, services: Mapping[str, ScepService], readiness: Readiness
) -> AsyncIterator[None]:
    """Flush the counts and sample the state gauges every SAMPLE_SECONDS while the context
    runs."""
    sampler = _sample_forever(metrics, services, readiness)
    task = asyncio.create_task(sampler, name="metrics-sampler")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _sample_forever(
    metrics: Metrics, services: Mapping[str, ScepService], readiness: Readiness
) -> None:
    tick = 0
    while True:
        try:
            metrics.flush()
            sample_pools(services, readiness)
            if tick % STORE_EVERY == 0:
                for name, service in services.items():
                    await sample_store(name, service)
        except Exception as exc:  # the sampler must outlive any one failure
            _failures.log(logging.ERROR, "sample", "metrics: sampling failed: %r", exc)
        tick += 1
        await asyncio.sleep(SAMPLE_SECONDS)


def sample_pools(services: Mapping[str, ScepService], readiness: Readiness) -> None:
    """Pool depth summed over this process's CAs, and each token's state."""
    m.IN_FLIGHT.set(sum(s.pool.pending for s in services.values()))
    m.QUEUE_DEPTH.set(sum(s.pool.queued() for s in services.values()))
    m.POOL_THREADS.set(sum(s.pool.size for s in services.values()))
    up: dict[str, bool] = {}
    for row in readiness():
        token = str(row["token"])
        up[token] = up.get(token, False) or bool(row["ready"])
    for token, ready in up.items():
        m.TOKEN_UP.labels(token).set(1 if ready else 0)


async def sample_store(ca: str, service: ScepService) -> None:
    """The current CRL's number and times, and the requests waiting for a decision."""
    try:
        status = await service.store.crl_status()
    except StoreError as exc:
        log.debug("metrics: reading the CRL status failed: %s", exc)
        m.STORE_ERRORS.labels("crl").inc()
    else:
        if status.latest is not None:
            m.CRL_NUMBER.labels(ca).set(status.latest.number)
            m.CRL_THIS_UPDATE.labels(ca).set(status.latest.this_update.timestamp())
            m.CRL_NEXT_UPDATE.labels(ca).set(status.latest.next_update.timestamp())
    try:
        held = await service.store.pending_requests()
    except StoreError as exc:
        log.debug("metrics: reading pending requests failed: %s", exc)
        m.STORE_ERRORS.labels("pending").inc()
    else:
        m.PENDING.labels(ca).set(sum(1 for r in held if r.status == "pending"))
