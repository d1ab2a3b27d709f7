"""The admin API: bearer token, JSON; disabled (404 throughout) when no token is configured.

Pending requests (list, approve, reject), revocation and one-time challenges. Every decision
is written to the audit log with the admin's address, never with the token. A failed
authentication is logged with the client's address and the endpoint; past a burst of them
an address gets 429 with Retry-After, and so does one issuing challenges too fast.
"""

from __future__ import annotations

import hmac
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from hsmscep.errors import MessageError
from hsmscep.policy import crl
from hsmscep.policy.profiles import DEFAULT_PROFILE, Profiles
from hsmscep.service.onetime import challenge_json, challenge_record, issue_challenge
from hsmscep.service.scep import ScepService
from hsmscep.store.records import PendingRequest
from hsmscep.web.ratelimit import RateLimit
from hsmscep.web.scep import service_of

audit = logging.getLogger("hsmscep.audit")
log = logging.getLogger(__name__)

# Per client address and worker process: a guessing client is slowed to one try in 3 s, a
# provisioning script may issue 60 challenges at once and one a second after.
FAILED_AUTH_BURST, FAILED_AUTH_INTERVAL = 20, 3.0
ISSUE_BURST, ISSUE_INTERVAL = 60, 1.0


class _Limits:
    def __init__(self) -> None:
        self.failures = RateLimit(FAILED_AUTH_BURST, FAILED_AUTH_INTERVAL)
        self.issuing = RateLimit(ISSUE_BURST, ISSUE_INTERVAL)


def _limits(request: Request) -> _Limits:
    # One set per app (not per module): in-process tests run several apps in one process.
    limits: _Limits | None = getattr(request.app.state, "admin_limits", None)
    if limits is None:
        limits = request.app.state.admin_limits = _Limits()
    return limits


def _too_many(wait: int, what: str) -> Response:
    return PlainTextResponse(
        f"too many {what}, retry later\n", status_code=429, headers={"Retry-After": str(wait)}
    )


_CHALLENGE_FIELDS = {"profile", "ttl_seconds", "subject_pattern", "san_pattern"}


def _refusal(request: Request, method: str) -> Response | None:
    """404 without a configured token, 401 unless the request carries it, 405 for another
    method than `method`; None: go ahead."""
    token: str | None = request.state.admin_token
    if token is None:
        return PlainTextResponse("not found\n", status_code=404)
    client, failures = _client(request), _limits(request).failures
    wait = failures.retry_after(client)
    if wait:  # before the token is even looked at: no guessing at full speed
        return _too_many(wait, "failed authentications")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Compared in constant time; neither the expected nor the given token is ever logged.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        wait = failures.spend(client)
        log.warning(
            "admin authentication failed: client %s, %s %s%s",
            client,
            request.method,
            request.url.path,
            f" (limited for {wait} s)" if wait else "",
        )
        return PlainTextResponse(
            "unauthorized\n", status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
    if request.method != method:
        return PlainTextResponse("method not allowed\n", status_code=405, headers={"Allow": method})
    return None


def _admin_service(request: Request) -> ScepService | None:
    """The CA an admin request is about: `?ca=NAME`, default the default CA."""
    return service_of(request, request.query_params.get("ca"))


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


async def _json_body(request: Request) -> Any:
    """The request's JSON document ({} for an empty body); MessageError if it is not JSON."""
    body = await request.body()
    try:
        return json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise MessageError("body must be JSON") from None


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


async def pending_list(request: Request) -> Response:
    """GET /admin/pending: every held request with its age and status."""
    refusal = _refusal(request, "GET")
    if refusal is not None:
        return refusal
    service = _admin_service(request)
    if service is None:
        return PlainTextResponse("no such CA\n", status_code=404)
    pending = await service.pending_requests()
    now = datetime.now(UTC)
    return JSONResponse([_pending_json(p, now, service.pending_ttl(p)) for p in pending])


async def pending_approve(request: Request) -> Response:
    """POST /admin/pending/{id}/approve: the client's next poll gets its certificate."""
    return await _decide(request, approve=True)


async def pending_reject(request: Request) -> Response:
    """POST /admin/pending/{id}/reject: the client's next poll gets a FAILURE."""
    return await _decide(request, approve=False)


async def _decide(request: Request, *, approve: bool) -> Response:
    refusal = _refusal(request, "POST")
    if refusal is not None:
        return refusal
    raw_id = request.path_params["id"]
    if not raw_id.isdigit() or len(raw_id) > 18:
        return PlainTextResponse("no such pending request\n", status_code=404)
    service = _admin_service(request)
    if service is None:
        return PlainTextResponse("no such CA\n", status_code=404)
    pending, changed = await service.decide(int(raw_id), approve)
    entry = {
        "event": "approve" if approve else "reject",
        "request": pending.id,
        "transaction_id": pending.transaction_id,
        "subject": pending.subject,
        "outcome": pending.status if changed else f"already {pending.status}",
        "admin_client": _client(request),
    }
    audit.info(json.dumps(entry, ensure_ascii=False))
    body = _pending_json(pending, datetime.now(UTC), service.pending_ttl(pending))
    return JSONResponse(body | {"changed": changed})


async def revoke(request: Request) -> Response:
    """POST /admin/certificates/{serial_hex}/revoke, body {"reason": "keyCompromise"} (optional:
    unspecified). Idempotent: revoking again keeps the first reason and time."""
    refusal = _refusal(request, "POST")
    if refusal is not None:
        return refusal
    serial = crl.parse_serial(request.path_params["serial"])
    if serial is None:
        return PlainTextResponse("no such certificate\n", status_code=404)
    document = await _json_body(request)
    if not isinstance(document, dict) or not isinstance(document.get("reason", "unspecified"), str):
        raise MessageError('body must be {"reason": "<RFC 5280 reason>"}')
    reason = crl.parse_reason(document.get("reason", "unspecified")).value  # or MessageError
    service = _admin_service(request)
    if service is None:
        return PlainTextResponse("no such CA\n", status_code=404)
    revocation, changed = await service.revoke(serial, reason)
    entry = crl.revocation_record(
        revocation.serial,
        revocation.reason,
        revocation.revoked_at,
        changed,
        f"admin:{_client(request)}",
    )
    audit.info(json.dumps(entry))
    return JSONResponse(entry | {"changed": changed})


async def issue(request: Request) -> Response:
    """POST /admin/challenges, body {"profile": NAME, "ttl_seconds": N, "subject_pattern": RE,
    "san_pattern": RE} (all optional): a fresh one-time challenge, shown only in this answer."""
    refusal = _refusal(request, "POST")
    if refusal is not None:
        return refusal
    wait = _limits(request).issuing.take(_client(request))
    if wait:
        log.warning("challenge issuing limited for client %s (%d s)", _client(request), wait)
        return _too_many(wait, "challenges issued")
    document = await _json_body(request)
    if not isinstance(document, dict):
        raise MessageError("body must be a JSON object")
    unknown = set(document) - _CHALLENGE_FIELDS
    if unknown:
        raise MessageError(f"unknown field(s): {', '.join(sorted(unknown))}")
    profiles: Profiles = request.state.profiles
    name = document.get("profile", DEFAULT_PROFILE)
    profile = profiles.get(name) if isinstance(name, str) else None
    # The challenge lives in the store of the CA that issues for the profile.
    service = service_of(request, profile.ca if profile is not None else None)
    assert service is not None
    # A wrong field is an InvalidChallengeRequest (a MessageError: 400) naming it.
    value, issued = await issue_challenge(
        service.store,
        profiles,
        name,
        ttl_seconds=document.get("ttl_seconds"),
        subject_pattern=document.get("subject_pattern"),
        san_pattern=document.get("san_pattern"),
    )
    audit.info(json.dumps(challenge_record(issued, f"admin:{_client(request)}")))
    request.state.metrics.challenge("issued")
    return JSONResponse(
        {"challenge": value} | challenge_json(issued),
        status_code=201,
        headers={"Cache-Control": "no-store"},
    )
