"""The ASGI app: create_app() puts the routes, the error map and the lifespan together.

The SCEP transport lives in web/scep.py, the admin API in web/admin.py, the error -> HTTP
map in web/errors.py and the wiring of pool, store and service in web/lifespan.py.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hsmscep import logs
from hsmscep.config.settings import Settings, load_settings
from hsmscep.policy import crl
from hsmscep.service.readiness import OK
from hsmscep.service.scep import ScepService
from hsmscep.web import admin, scep, scrape
from hsmscep.web.errors import EXCEPTION_HANDLERS, RETRY_AFTER
from hsmscep.web.lifespan import KeyBackend, Pkcs11Keys, lifespan
from hsmscep.web.requestlog import RequestLog

_ALL_METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"]


def create_app(settings: Settings, keys: KeyBackend | None = None) -> Starlette:
    """Build the ASGI app; its lifespan opens the signing pool and the store in this process.

    `keys`: where the signing workers get their keys; PKCS#11 tokens unless given.
    """
    routes = [
        Route("/scep", scep.scep_endpoint, methods=_ALL_METHODS),
        Route("/scep/{suffix:path}", scep.scep_endpoint, methods=_ALL_METHODS),
        Route("/cgi-bin/pkiclient.exe", scep.scep_endpoint, methods=_ALL_METHODS),
        Route("/healthz", health, methods=["GET"]),
        Route("/readyz", ready, methods=["GET"]),
        Route(settings.metrics.path, scrape.metrics_endpoint, methods=["GET"]),
        Route(crl.CRL_PATH, scep.crl_endpoint, methods=["GET", "HEAD"]),
        Route(crl.CA_CERT_PATH, scep.ca_cert_endpoint, methods=["GET", "HEAD"]),
        Route("/ca-cross.crt", scep.cross_cert_endpoint, methods=["GET", "HEAD"]),
        Route("/crl/{ca}.crl", scep.crl_endpoint, methods=["GET", "HEAD"]),
        Route("/ca/{ca}.crt", scep.ca_cert_endpoint, methods=["GET", "HEAD"]),
        # Every method reaches the handler: without a token the admin API is 404 throughout.
        Route("/admin/pending", admin.pending_list, methods=_ALL_METHODS),
        Route("/admin/pending/{id}/approve", admin.pending_approve, methods=_ALL_METHODS),
        Route("/admin/pending/{id}/reject", admin.pending_reject, methods=_ALL_METHODS),
        Route("/admin/certificates/{serial}/revoke", admin.revoke, methods=_ALL_METHODS),
        Route("/admin/challenges", admin.issue, methods=_ALL_METHODS),
    ]
    return Starlette(
        routes=routes,
        exception_handlers=dict(EXCEPTION_HANDLERS),
        middleware=[Middleware(RequestLog, access_log=settings.log.access)],
        lifespan=lifespan(settings, keys or Pkcs11Keys()),
    )


def app_from_env() -> Starlette:
    """uvicorn factory for worker processes: the config path travels in HSMSCEP_CONFIG."""
    settings = load_settings(os.environ["HSMSCEP_CONFIG"])
    logs.configure(settings.log.level, settings.log.format, dict(settings.log.levels))
    return create_app(settings)


async def health(request: Request) -> Response:
    """The process answers: always 200 (liveness; whether it can sign is /readyz)."""
    return JSONResponse({"status": "ok", "pid": os.getpid()})


async def ready(request: Request) -> Response:
    """200 while this process can issue, else 503 with Retry-After; the JSON body names each
    check ("ok" or why not): every key's token (or one of its replicas) logged in and
    answering, the store writable, the CRL not past nextUpdate, the CA and RA certificates
    valid. Per CA, a failing check's text names the CA when there are several."""
    tokens = request.state.readiness()
    hsm_ok = all(t["group_ready"] for t in tokens)
    services: dict[str, ScepService] = request.state.services
    per_ca = {name: await service.readiness.checks() for name, service in services.items()}
    checks: dict[str, object] = {"hsm": {"ready": hsm_ok, "tokens": tokens}}
    for check in ("store", "crl", "ca"):
        failing = {name: c[check] for name, c in per_ca.items() if c[check] != OK}
        if len(per_ca) > 1:
            checks[check] = "; ".join(f"{name}: {why}" for name, why in failing.items()) or OK
        else:
            checks[check] = next(iter(failing.values()), OK)
    ok = hsm_ok and all(checks[c] == OK for c in ("store", "crl", "ca"))
    body = {"ready": ok, "checks": checks}
    return JSONResponse(body, status_code=200 if ok else 503, headers=None if ok else RETRY_AFTER)
