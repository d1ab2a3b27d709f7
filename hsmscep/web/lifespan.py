"""Wiring: the app's lifespan builds, per CA, the signing pool, the store and the service.

Runs in every worker process (uvicorn spawns): nothing here happens at import time. Where
the workers' keys come from is a seam (KeyBackend): PKCS#11 tokens in production, software
keys in the in-process tests (hsmscep.testing.softkeys).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from starlette.applications import Starlette

from hsmscep.config.settings import Settings
from hsmscep.errors import ConfigError
from hsmscep.hsm.autosize import keep_sized
from hsmscep.hsm.keyring import Keyring, KeySource
from hsmscep.hsm.login import TokenLogin, describe
from hsmscep.hsm.pool import SigningPool, latency_hiding_size
from hsmscep.hsm.refs import TokenRef
from hsmscep.policy.profiles import DEFAULT_CA, Profiles
from hsmscep.policy.renewal import RenewalPolicy
from hsmscep.service.ports import KeySet, Store
from hsmscep.service.scep import ScepService, default_policy
from hsmscep.store.backends import open_store
from hsmscep.store.groupcommit import GroupCommitter
from hsmscep.web import affinity, gauges
from hsmscep.web.metrics import Metrics, NoMetrics
from hsmscep.webhook.client import WebhookClient

log = logging.getLogger(__name__)

MAX_SESSIONS = 128  # signing sessions per HSM from all processes of a default-sized server
Lifespan = Callable[[Starlette], AbstractAsyncContextManager[dict[str, Any]]]


class WorkerKeys(KeySet, Protocol):
    """One signing worker's keys, opened on the worker's own thread."""

    def check_certificates(self) -> None:
        """ConfigError unless every certificate belongs to its key."""
        ...

    def close(self) -> None: ...

    def stale(self) -> bool:
        """True when the keys should be reopened before the next job (a token changed)."""
        ...

    def latency(self) -> tuple[float, float]:
        """(CPU seconds, seconds waiting) of one private-key operation."""
        ...


class KeyBackend(Protocol):
    """Where a CA's signing workers get their keys."""

    def open(self, source: KeySource) -> AbstractAsyncContextManager[Callable[[], WorkerKeys]]:
        """While open: a function each worker thread calls to open its own WorkerKeys."""
        ...

    def readiness(self) -> list[dict[str, object]]:
        """Per token: {"token", "ready", "reason", "group_ready"} (a group: a token and its
        replicas; the server can sign while every group has a ready member)."""
        ...


class Pkcs11Keys:
    """The production backend: each worker opens its own sessions on the PKCS#11 tokens."""

    def __init__(self) -> None:
        self._watched: list[tuple[TokenLogin, list[list[TokenRef]]]] = []

    @asynccontextmanager
    async def open(self, source: KeySource) -> AsyncIterator[Callable[[], WorkerKeys]]:
        # One login per token and process, kept open while the workers run (architecture.md).
        logins = TokenLogin()
        keys = [source.ca_key, source.ra_sign_key, *(ref for ref, _ in source.decrypt)]
        groups = [source.members(t) for t in dict.fromkeys(k.token for k in keys)]
        watched = (logins, groups)
        self._watched.append(watched)
        try:
            yield lambda: Keyring.open(source, logins)
        finally:
            self._watched.remove(watched)
            await asyncio.to_thread(logins.close)

    def readiness(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for logins, groups in self._watched:
            for group in groups:
                states = [(ref, *logins.state(ref)) for ref in group]
                usable = any(ok for _, ok, _ in states)
                rows += [
                    {"token": describe(ref), "ready": ok, "reason": why, "group_ready": usable}
                    for ref, ok, why in states
                ]
        return rows


def lifespan(settings: Settings, keys: KeyBackend) -> Lifespan:
    """The lifespan of an app serving `settings`: one service per CA a profile issues from."""

    @asynccontextmanager
    async def run(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        profiles = settings.profiles
        metrics = Metrics() if settings.metrics.enabled else NoMetrics()
        if metrics.enabled:
            GroupCommitter.observer = metrics.commit  # one per process: the series are too
            metrics.build_info(settings.pkcs11.token.module)
        async with AsyncExitStack() as stack:
            stack.callback(metrics.flush)  # last: the counts of the final requests
            webhooks: WebhookClient | None = None
            if any(p.webhook or p.notify for p in profiles.all()):
                webhooks = WebhookClient(observe=metrics.webhook if metrics.enabled else None)
                stack.push_async_callback(webhooks.aclose)
            services: dict[str, ScepService] = {}
            for name in settings.ca_names:
                ca_settings = settings.for_ca(name)
                ca_profiles = ca_settings.ca_profiles()
                if ca_profiles is None:
                    log.warning("CA %r is configured but no profile uses it", name)
                    continue
                services[name] = await stack.enter_async_context(
                    _running_service(ca_settings, ca_profiles, webhooks, keys, metrics)
                )
            if metrics.enabled:
                await stack.enter_async_context(gauges.sampling(metrics, services, keys.readiness))
            yield {
                "metrics": metrics,
                "metrics_settings": settings.metrics,
                "services": services,
                "profiles": profiles,
                "max_body": settings.server.max_body,
                "admin_token": settings.admin.token,
                "readiness": keys.readiness,
            }

    return run


@asynccontextmanager
async def _running_service(
    settings: Settings,
    profiles: Profiles,
    webhooks: WebhookClient | None,
    keys: KeyBackend,
    metrics: Metrics,
) -> AsyncIterator[ScepService]:
    """The service of one CA (`settings.for_ca(name)`) and the profiles it issues for."""
    if settings.ca.name == DEFAULT_CA:
        ca_cert = _load_cert(settings.ca.cert, "ca.cert")
        ra_sign = _load_cert(settings.ra.cert, "ra.cert")
        ra_decrypt = _load_cert(settings.ra_decrypt.cert, "ra_decrypt.cert")
    else:
        where, init = f"cas.{settings.ca.name}", f"hsmscep init --ca {settings.ca.name}"
        ca_cert = _load_cert(settings.ca.cert, f"{where}.cert", init)
        ra_sign = ra_decrypt = _load_cert(settings.ra.cert, f"{where}.ra_cert", init)
    previous = [(k, p) for k, p in settings.rollover.previous_ra if k != settings.ra_decrypt.key]
    upcoming = settings.rollover.next
    next_certs: list[x509.Certificate] = []
    if upcoming is not None:
        next_certs = [
            _load_cert(upcoming.ca_cert, "rollover next.ca_cert"),
            _load_cert(upcoming.ra_cert, "rollover next.ra_cert"),
        ]
        if upcoming.ca_chain is not None:
            next_certs += x509.load_pem_x509_certificates(upcoming.ca_chain.read_bytes())
        if upcoming.cross_cert is not None:
            next_certs.append(_load_cert(upcoming.cross_cert, "rollover next.cross_cert"))
    chain = (
        x509.load_pem_x509_certificates(settings.ca.chain.read_bytes())
        if settings.ca.chain is not None and settings.ca.chain.exists()
        else []
    )
    # NewWithOld is not in GetCACert: it has the new root's subject and (the names being
    # equal) its issuer name too, and clients that build chains by name take it for the root
    # (certmonger: "certificate verify error"). It is served at /ca-cross.crt instead.
    cross = (
        _load_cert(settings.ca.cross_cert, "rollover current.cross_cert")
        if settings.ca.cross_cert is not None
        else None
    )
    previous_ra = [(key, _load_cert(path, "rollover previous_ra.cert")) for key, path in previous]
    source = KeySource(
        ca_key=settings.ca.key,
        ca_cert=ca_cert,
        ra_sign_key=settings.ra.key,
        ra_sign_cert=ra_sign,
        # The current RA key first (the hot path matches it at once), then the RA keys of
        # earlier rollover generations: clients may still encrypt to an old RA certificate.
        decrypt=[
            (settings.ra_decrypt.key, ra_decrypt),
            *previous_ra,
        ],
        previous_signers=previous_ra,
        replicas={settings.pkcs11.token: settings.pkcs11.replicas},
        observe=metrics.hsm_operation if metrics.enabled else None,
    )
    if metrics.enabled:
        upcoming_ca = next_certs[0] if next_certs else None
        roles = {"ca": ca_cert, "ra": ra_sign, "ra_decrypt": ra_decrypt, "next_ca": upcoming_ca}
        gauges.certificates(settings.ca.name, roles)
    # SoftHSM2 is CPU-bound: with one process per core, one session per process keeps every
    # core busy with the least GIL contention (measured in bench/PROFILE.md). Network HSMs
    # are latency-bound: the default pool grows once the round trip is measured (below).
    cores = len(affinity.usable_cpus())
    processes = affinity.worker_processes(settings.server.workers)
    size = settings.server.pool_size or max(1, cores // processes)
    async with keys.open(source) as open_keys:
        pool: SigningPool[WorkerKeys] = SigningPool(
            open_keys,
            size=size,
            max_pending=settings.server.max_pending,
            close_context=lambda worker_keys: worker_keys.close(),
            stale=lambda worker_keys: worker_keys.stale(),
            wait_observer=metrics.wait_observer if metrics.enabled else None,
            on_reject=metrics.rejected if metrics.enabled else None,
        )
        # Typed as the port: mypy proves here that the SQLite backend implements it.
        store: Store | None = None
        sizer: asyncio.Task[None] | None = None
        try:
            await pool.start()
            await pool.run(lambda worker_keys: worker_keys.check_certificates())
            if not settings.server.pool_size:
                cap = await _hide_latency(pool, size, processes, settings.server.max_pending)
                if cap is not None:
                    sizer = asyncio.create_task(keep_sized(pool, cap), name="pool-autosize")
            store = await _open_store(settings)
            ra_certs = [ra_sign] if ra_decrypt == ra_sign else [ra_sign, ra_decrypt]
            service = ScepService(
                pool=pool,
                store=store,
                ca_cert=ca_cert,
                ra_certs=ra_certs,
                chain=chain,
                policy=default_policy(None, settings.crl.base_url, settings.ca.name),
                profiles=profiles,
                webhooks=webhooks,
                crl_lifetime=timedelta(hours=settings.crl.next_update_hours),
                renewal=RenewalPolicy(
                    enabled=settings.renewal.enabled,
                    window=timedelta(days=settings.renewal.window_days),
                    allow_key_reuse=settings.renewal.allow_key_reuse,
                    revoke_replaced=settings.renewal.revoke_replaced,
                ),
                next_ca_certs=next_certs,
                cross_cert=cross,
                challenge_event=metrics.challenge if metrics.enabled else None,
            )
            async with service.crl_refresher():
                yield service
        finally:
            if sizer is not None:
                sizer.cancel()
                await asyncio.gather(sizer, return_exceptions=True)
            await pool.aclose()
            if store is not None:
                await store.close()


async def _open_store(settings: Settings) -> Store:
    """The CA's store: PostgreSQL when [store] url is set, else its SQLite file."""
    if settings.store.url is not None and settings.ca.name != DEFAULT_CA:
        # One database holds one CA's serials and CRLs; extra CAs would mix theirs in.
        raise ConfigError(
            f"cas.{settings.ca.name}: store.url (PostgreSQL) serves the default CA only;"
            " run the other CA's nodes with their own store.url"
        )
    return await open_store(
        settings.store.location,
        password=settings.store.password,
        synchronous=settings.store.synchronous,
        linger=settings.store.commit_linger_ms / 1000,
    )


async def _hide_latency(
    pool: SigningPool[WorkerKeys], base: int, processes: int, max_pending: int
) -> int | None:
    """Grow the default pool so that HSM round trips do not leave the CPU idle; the cap for
    growing it further at run time, None for a local token (all CPU: the pool stays)."""
    cpu_op, wait_op = await pool.run(lambda worker_keys: worker_keys.latency())
    # At most 128 sessions per HSM from all processes together, and never more threads
    # than jobs admitted.
    cap = min(max_pending, max(base, MAX_SESSIONS // processes))
    wanted = latency_hiding_size(base, cpu_op, wait_op, cap=cap)
    log.info(
        "HSM operation: %.2f ms CPU, %.2f ms waiting; %d signing threads",
        cpu_op * 1000,
        wait_op * 1000,
        wanted,
    )
    if wanted > base:
        await pool.grow(wanted)
    return cap if wanted > base else None


def settings_tokens(settings: Settings) -> list[TokenRef]:
    """Every token a server of `settings` logs in to, each once."""
    refs: list[TokenRef] = []
    for name in settings.ca_names:
        ca = settings.for_ca(name)
        keys = [ca.ca.key, ca.ra.key, ca.ra_decrypt.key, *(k for k, _ in ca.rollover.previous_ra)]
        refs += [key.token for key in keys]
    return list(dict.fromkeys(refs))


def _load_cert(path: Path, key: str, init: str = "hsmscep init") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist (run `{init}` first)") from None
    except ValueError as exc:
        raise ConfigError(f"{key}: {path} is not a PEM certificate: {exc}") from None
