"""The HTTP edge (Starlette): routes, request decoding, limits, and the error -> HTTP mapping.

The only module that knows status codes. Before a pkiMessage's signature verifies, problems
are a 4xx with a short plain-text reason; after, the service answers with a signed CertRep.
503 with Retry-After is the only 5xx a client should ever see (overload, HSM or store down).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from hsmscep import logs
from hsmscep.config.settings import Settings, load_settings
from hsmscep.errors import (
    ConfigError,
    HsmBusy,
    HsmError,
    MessageError,
    PayloadTooLarge,
    RequestConflict,
    StoreError,
    UnknownCertificate,
    UnknownProfile,
    UnknownRequest,
)
from hsmscep.hsm.cryptoki import TokenLogin
from hsmscep.hsm.keyring import Keyring, KeySource
from hsmscep.hsm.pool import SigningPool
from hsmscep.policy import crl
from hsmscep.policy.profiles import DEFAULT_CA, DEFAULT_PROFILE, Profiles
from hsmscep.policy.renewal import RenewalPolicy
from hsmscep.service.onetime import challenge_json, challenge_record, issue_challenge
from hsmscep.service.scep import NEXT_CA_CERT, ScepService, default_policy
from hsmscep.store.records import PendingRequest
from hsmscep.store.sqlite import CertStore
from hsmscep.web import affinity
from hsmscep.webhook.client import WebhookClient

log = logging.getLogger(__name__)
audit = logging.getLogger("hsmscep.audit")

PKI_MESSAGE = "application/x-pki-message"
PKIX_CRL = "application/pkix-crl"  # RFC 5280 §4.2.1.13
PKIX_CERT = "application/pkix-cert"  # RFC 5280 §4.2.2.1
RETRY_AFTER = {"Retry-After": "1"}


def create_app(settings: Settings) -> Starlette:
    """Build the ASGI app; the lifespan opens the HSM pool and the store in this process."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        profiles = settings.profiles
        async with AsyncExitStack() as stack:
            webhooks: WebhookClient | None = None
            if any(p.webhook or p.notify for p in profiles.all()):
                webhooks = WebhookClient()
                stack.push_async_callback(webhooks.aclose)
            # One service (signing pool, store, CRL) per CA that a profile issues from.
            services: dict[str, ScepService] = {}
            for name in settings.ca_names:
                ca_settings = settings.for_ca(name)
                ca_profiles = ca_settings.ca_profiles()
                if ca_profiles is None:
                    log.warning("CA %r is configured but no profile uses it", name)
                    continue
                services[name] = await stack.enter_async_context(
                    _running_service(ca_settings, ca_profiles, webhooks)
                )
            yield {
                "services": services,
                "profiles": profiles,
                "max_body": settings.server.max_body,
                "admin_token": settings.admin.token,
            }

    routes = [
        Route("/scep", scep_endpoint, methods=_ALL_METHODS),
        Route("/scep/{suffix:path}", scep_endpoint, methods=_ALL_METHODS),
        Route("/cgi-bin/pkiclient.exe", scep_endpoint, methods=_ALL_METHODS),
        Route("/healthz", health, methods=["GET"]),
        Route(crl.CRL_PATH, crl_endpoint, methods=["GET", "HEAD"]),
        Route(crl.CA_CERT_PATH, ca_cert_endpoint, methods=["GET", "HEAD"]),
        Route("/crl/{ca}.crl", crl_endpoint, methods=["GET", "HEAD"]),
        Route("/ca/{ca}.crt", ca_cert_endpoint, methods=["GET", "HEAD"]),
        # Every method reaches the handler: without a token the admin API is 404 throughout.
        Route("/admin/pending", admin_pending_list, methods=_ALL_METHODS),
        Route("/admin/pending/{id}/approve", admin_pending_approve, methods=_ALL_METHODS),
        Route("/admin/pending/{id}/reject", admin_pending_reject, methods=_ALL_METHODS),
        Route("/admin/certificates/{serial}/revoke", admin_revoke, methods=_ALL_METHODS),
        Route("/admin/challenges", admin_challenge, methods=_ALL_METHODS),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def app_from_env() -> Starlette:
    """uvicorn factory for worker processes: the config path travels in HSMSCEP_CONFIG."""
    settings = load_settings(os.environ["HSMSCEP_CONFIG"])
    logs.configure(settings.log.level)
    return create_app(settings)


_ALL_METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"]


@asynccontextmanager
async def _running_service(
    settings: Settings, profiles: Profiles, webhooks: WebhookClient | None
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
    if settings.ca.cross_cert is not None:
        # NewWithOld after the CA and RA certificates: clients that trust only the previous
        # root build new CA -> cross certificate -> previous root.
        chain.append(_load_cert(settings.ca.cross_cert, "rollover current.cross_cert"))
    source = KeySource(
        ca_key=settings.ca.key,
        ca_cert=ca_cert,
        ra_sign_key=settings.ra.key,
        ra_sign_cert=ra_sign,
        # The current RA key first (the hot path matches it at once), then the RA keys of
        # earlier rollover generations: clients may still encrypt to an old RA certificate.
        decrypt=[
            (settings.ra_decrypt.key, ra_decrypt),
            *((key, _load_cert(path, "rollover previous_ra.cert")) for key, path in previous),
        ],
    )
    logins = TokenLogin()
    # SoftHSM2 is CPU-bound: with one process per core, one session per process keeps every
    # core busy with the least GIL contention (measured in bench/PROFILE.md). Network HSMs
    # are latency-bound and want pool_size set to ~30.
    cores = len(affinity.usable_cpus())
    size = settings.server.pool_size or max(
        1, cores // affinity.worker_processes(settings.server.workers)
    )
    pool: SigningPool[Keyring] = SigningPool(
        lambda: Keyring.open(source, logins),
        size=size,
        max_pending=settings.server.max_pending,
        close_context=Keyring.close,
    )
    store: CertStore | None = None
    try:
        await pool.start()
        await pool.run(Keyring.check_certificates)
        store = await CertStore.open(
            settings.store.path,
            synchronous=settings.store.synchronous,
            linger=settings.store.commit_linger_ms / 1000,
        )
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
        )
        async with service.crl_refresher():
            yield service
    finally:
        await pool.aclose()
        if store is not None:
            await store.close()
        await asyncio.to_thread(logins.close)


def _load_cert(path: Path, key: str, init: str = "hsmscep init") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist (run `{init}` first)") from None
    except ValueError as exc:
        raise ConfigError(f"{key}: {path} is not a PEM certificate: {exc}") from None


# ---- handlers ---------------------------------------------------------------------------


async def health(request: Request) -> Response:
    return PlainTextResponse("ok\n")


def _service(request: Request, name: str | None) -> ScepService | None:
    """The service of CA `name` (None: the default CA); None if there is no such CA."""
    services: dict[str, ScepService] = request.state.services
    return services.get(name or DEFAULT_CA)


async def crl_endpoint(request: Request) -> Response:
    """A CA's current CRL (DER), the URL its certificates name as their CRL DP."""
    service = _service(request, request.path_params.get("ca"))
    if service is None or request.path_params.get("ca") == DEFAULT_CA:
        return PlainTextResponse("not found\n", status_code=404)
    try:
        der = await service.current_crl()
    except HsmBusy:
        return PlainTextResponse("busy, retry later\n", status_code=503, headers=RETRY_AFTER)
    except (HsmError, StoreError) as exc:
        log.error("CRL request failed: %s", exc)
        return PlainTextResponse("temporarily unavailable\n", status_code=503, headers=RETRY_AFTER)
    return Response(der, media_type=PKIX_CRL)


async def ca_cert_endpoint(request: Request) -> Response:
    """A CA certificate (DER), the AIA caIssuers URL of its certificates."""
    service = _service(request, request.path_params.get("ca"))
    if service is None or request.path_params.get("ca") == DEFAULT_CA:
        return PlainTextResponse("not found\n", status_code=404)
    return Response(service.ca_cert_der, media_type=PKIX_CERT)


# ---- the admin API: bearer token, JSON; disabled (404) when no token is configured ---------


def _admin_refusal(request: Request, method: str) -> Response | None:
    """404 without a configured token, 401 unless the request carries it, 405 for another
    method than `method`; None: go ahead."""
    token: str | None = request.state.admin_token
    if token is None:
        return PlainTextResponse("not found\n", status_code=404)
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Compared in constant time; neither the expected nor the given token is ever logged.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        return PlainTextResponse(
            "unauthorized\n", status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
    if request.method != method:
        return PlainTextResponse("method not allowed\n", status_code=405, headers={"Allow": method})
    return None


def _admin_service(request: Request) -> ScepService | None:
    """The CA an admin request is about: `?ca=NAME`, default the default CA."""
    return _service(request, request.query_params.get("ca"))


def _pending_json(pending: PendingRequest, now: datetime, ttl: timedelta) -> dict[str, Any]:
    return {
        "id": pending.id,
        "transaction_id": pending.transaction_id,
        "subject": pending.subject,
        "sans": list(pending.sans),
        "key": pending.key_description,
        "requester_ip": pending.requester_ip,
        "requester_fingerprint": pending.requester_fingerprint,
        "created_at": pending.created_at.isoformat(),
        "age_seconds": max(0, int((now - pending.created_at).total_seconds())),
        "status": pending.status,
        "expired": pending.expired(now, ttl),
        "profile": pending.profile,
    }


async def admin_pending_list(request: Request) -> Response:
    refusal = _admin_refusal(request, "GET")
    if refusal is not None:
        return refusal
    service = _admin_service(request)
    if service is None:
        return PlainTextResponse("no such CA\n", status_code=404)
    try:
        pending = await service.pending_requests()
    except StoreError as exc:
        log.error("admin: listing pending requests failed: %s", exc)
        return PlainTextResponse("temporarily unavailable\n", status_code=503, headers=RETRY_AFTER)
    now = datetime.now(UTC)
    return JSONResponse([_pending_json(p, now, service.pending_ttl(p)) for p in pending])


async def admin_pending_approve(request: Request) -> Response:
    return await _admin_decide(request, approve=True)


async def admin_pending_reject(request: Request) -> Response:
    return await _admin_decide(request, approve=False)


async def _admin_decide(request: Request, *, approve: bool) -> Response:
    refusal = _admin_refusal(request, "POST")
    if refusal is not None:
        return refusal
    raw_id = request.path_params["id"]
    if not raw_id.isdigit() or len(raw_id) > 18:
        return PlainTextResponse("no such pending request\n", status_code=404)
    service = _admin_service(request)
    if service is None:
        return PlainTextResponse("no such CA\n", status_code=404)
    try:
        pending, changed = await service.decide(int(raw_id), approve)
    except UnknownRequest as exc:
        return PlainTextResponse(f"{exc}\n", status_code=404)
    except RequestConflict as exc:
        return PlainTextResponse(f"{exc}\n", status_code=409)
    except StoreError as exc:
        log.error("admin: deciding request %s failed: %s", raw_id, exc)
        return PlainTextResponse("temporarily unavailable\n", status_code=503, headers=RETRY_AFTER)
    client = request.client.host if request.client else "-"
    audit.info(
        json.dumps(
            {
                "event": "approve" if approve else "reject",
                "request": pending.id,
                "transaction_id": pending.transaction_id,
                "subject": pending.subject,
                "outcome": pending.status if changed else f"already {pending.status}",
                "admin_client": client,
            },
            ensure_ascii=False,
        )
    )
    body = _pending_json(pending, datetime.now(UTC), service.pending_ttl(pending))
    return JSONResponse(body | {"changed": changed})


async def admin_revoke(request: Request) -> Response:
    """POST /admin/certificates/{serial_hex}/revoke, body {"reason": "keyCompromise"} (optional:
    unspecified). Idempotent: revoking again keeps the first reason and time."""
    refusal = _admin_refusal(request, "POST")
    if refusal is not None:
        return refusal
    raw_serial = request.path_params["serial"]
    serial = crl.parse_serial(raw_serial)
    if serial is None:
        return PlainTextResponse("no such certificate\n", status_code=404)
    body = await request.body()
    try:
        document = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return PlainTextResponse("body must be JSON\n", status_code=400)
    if not isinstance(document, dict) or not isinstance(document.get("reason", "unspecified"), str):
        return PlainTextResponse('body must be {"reason": "<RFC 5280 reason>"}\n', 400)
    try:
        reason = crl.parse_reason(document.get("reason", "unspecified")).value
    except ValueError as exc:
        return PlainTextResponse(f"{exc}\n", status_code=400)
    service = _admin_service(request)
    if service is None:
        return PlainTextResponse("no such CA\n", status_code=404)
    try:
        revocation, changed = await service.revoke(serial, reason)
    except UnknownCertificate as exc:
        return PlainTextResponse(f"{exc}\n", status_code=404)
    except StoreError as exc:
        log.error("admin: revoking %x failed: %s", serial, exc)
        return PlainTextResponse("temporarily unavailable\n", status_code=503, headers=RETRY_AFTER)
    client = request.client.host if request.client else "-"
    entry = crl.revocation_record(
        revocation.serial, revocation.reason, revocation.revoked_at, changed, f"admin:{client}"
    )
    audit.info(json.dumps(entry))
    return JSONResponse(entry | {"changed": changed})


async def admin_challenge(request: Request) -> Response:
    """POST /admin/challenges, body {"profile": NAME, "ttl_seconds": N, "subject_pattern": RE,
    "san_pattern": RE} (all optional): a fresh one-time challenge, shown only in this answer."""
    refusal = _admin_refusal(request, "POST")
    if refusal is not None:
        return refusal
    body = await request.body()
    try:
        document = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return PlainTextResponse("body must be JSON\n", status_code=400)
    if not isinstance(document, dict):
        return PlainTextResponse("body must be a JSON object\n", status_code=400)
    unknown = set(document) - {"profile", "ttl_seconds", "subject_pattern", "san_pattern"}
    if unknown:
        return PlainTextResponse(f"unknown field(s): {', '.join(sorted(unknown))}\n", 400)
    profiles: Profiles = request.state.profiles
    name = document.get("profile", DEFAULT_PROFILE)
    profile = profiles.get(name) if isinstance(name, str) else None
    # The challenge lives in the store of the CA that issues for the profile.
    service = _service(request, profile.ca if profile is not None else None)
    assert service is not None
    try:
        value, issued = await issue_challenge(
            service.store,
            profiles,
            name,
            ttl_seconds=document.get("ttl_seconds"),
            subject_pattern=document.get("subject_pattern"),
            san_pattern=document.get("san_pattern"),
        )
    except UnknownProfile as exc:
        return PlainTextResponse(f"{exc}\n", status_code=404)
    except ValueError as exc:
        return PlainTextResponse(f"{exc}\n", status_code=400)
    except StoreError as exc:
        log.error("admin: issuing a challenge failed: %s", exc)
        return PlainTextResponse("temporarily unavailable\n", status_code=503, headers=RETRY_AFTER)
    client = request.client.host if request.client else "-"
    audit.info(json.dumps(challenge_record(issued, f"admin:{client}")))
    return JSONResponse(
        {"challenge": value} | challenge_json(issued),
        status_code=201,
        headers={"Cache-Control": "no-store"},
    )


async def scep_endpoint(request: Request) -> Response:
    try:
        return await _scep(request)
    except MessageError as exc:
        return PlainTextResponse(f"{exc}\n", status_code=400)
    except PayloadTooLarge as exc:
        return PlainTextResponse(f"{exc}\n", status_code=413)
    except ClientDisconnect:
        return PlainTextResponse("client disconnected\n", status_code=400)
    except HsmBusy:
        return PlainTextResponse("busy, retry later\n", status_code=503, headers=RETRY_AFTER)
    except (HsmError, StoreError) as exc:
        log.error("request failed: %s", exc)
        return PlainTextResponse("temporarily unavailable\n", status_code=503, headers=RETRY_AFTER)


async def _scep(request: Request) -> Response:
    if request.method not in ("GET", "POST"):
        return PlainTextResponse(
            "method not allowed\n", status_code=405, headers={"Allow": "GET, POST"}
        )
    params = _query_params(request.scope.get("query_string", b""))
    operations = params.get(b"operation", [])
    if len(operations) != 1:
        reason = "operation parameter missing" if not operations else "operation given twice"
        raise MessageError(reason)
    operation = unquote_to_bytes(operations[0]).decode("latin-1")
    profiles: Profiles = request.state.profiles
    profile = profiles.for_path(request.path_params.get("suffix", ""))
    service: ScepService = request.state.services[profile.ca]
    if operation == "GetCACaps":
        return Response(service.ca_caps(profile), media_type="text/plain")
    if operation == "GetCACert":
        # Any message= value is fine: CA identifiers, "default", Apple instance names.
        return Response(service.ca_cert_body, media_type=service.ca_cert_type)
    if operation == "GetNextCACert":
        body = await service.next_ca_cert()
        if body is None:
            return PlainTextResponse("no next CA certificate\n", status_code=404)
        return Response(body, media_type=NEXT_CA_CERT)
    if operation != "PKIOperation":
        raise MessageError(f"unknown operation {operation[:40]!r}")
    if request.method == "POST":
        der = await _read_body(request, request.state.max_body)
    else:
        messages = params.get(b"message", [])
        if len(messages) != 1:
            raise MessageError("PKIOperation over GET needs exactly one message parameter")
        if len(messages[0]) > request.state.max_body * 2:
            raise PayloadTooLarge("message parameter too large")
        der = decode_message_param(messages[0])
    client = request.client.host if request.client else "-"
    reply = await service.pki_operation(der, client, profile)
    return Response(reply, media_type=PKI_MESSAGE)


def _query_params(query: bytes) -> dict[bytes, list[bytes]]:
    # Parsed by hand from the raw bytes: form decoding would turn a raw '+' in a base64
    # message into a space (interop-quirks #1).
    params: dict[bytes, list[bytes]] = {}
    for part in query.split(b"&"):
        if part:
            name, _, value = part.partition(b"=")
            params.setdefault(name, []).append(value)
    return params


_WHITESPACE = bytes.maketrans(b"", b"")


def decode_message_param(raw: bytes) -> bytes:
    """Decode a GET message= value in every base64 variant clients send (interop-quirks #1)."""
    text = unquote_to_bytes(raw).replace(b" ", b"+")
    text = text.translate(_WHITESPACE, b"\r\n\t").replace(b"-", b"+").replace(b"_", b"/")
    text = text.rstrip(b"=")
    text += b"=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError("message parameter is not base64") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
