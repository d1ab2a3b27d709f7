"""The SCEP transport (RFC 8894 §4): operation dispatch, GET/POST PKIOperation decoding,
GetCACaps, GetCACert, GetNextCACert, and the CRL and CA certificate a CA publishes.

Before a pkiMessage's signature verifies, problems are raised (web/errors.py answers 4xx);
after, the service answers with a signed CertRep.
"""

from __future__ import annotations

import base64
import binascii
import time
from urllib.parse import unquote_to_bytes

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from hsmscep.errors import HsmBusy, MessageError, PayloadTooLarge, StoreError
from hsmscep.policy.profiles import DEFAULT_CA, Profiles
from hsmscep.service.audit import record_http_refusal
from hsmscep.service.scep import NEXT_CA_CERT, ScepService
from hsmscep.web.errors import status_of
from hsmscep.web.metrics import Metrics
from hsmscep.web.series import MESSAGE_TYPES, OPERATIONS

PKI_MESSAGE = "application/x-pki-message"
PKIX_CRL = "application/pkix-crl"  # RFC 5280 §4.2.1.13
PKIX_CERT = "application/pkix-cert"  # RFC 5280 §4.2.2.1


def service_of(request: Request, name: str | None) -> ScepService | None:
    """The service of CA `name` (None: the default CA); None if there is no such CA."""
    services: dict[str, ScepService] = request.state.services
    return services.get(name or DEFAULT_CA)


async def crl_endpoint(request: Request) -> Response:
    """A CA's current CRL (DER), the URL its certificates name as their CRL DP."""
    service = service_of(request, request.path_params.get("ca"))
    if service is None or request.path_params.get("ca") == DEFAULT_CA:
        return PlainTextResponse("not found\n", status_code=404)
    return Response(await service.current_crl(), media_type=PKIX_CRL)


async def ca_cert_endpoint(request: Request) -> Response:
    """A CA certificate (DER), the AIA caIssuers URL of its certificates."""
    service = service_of(request, request.path_params.get("ca"))
    if service is None or request.path_params.get("ca") == DEFAULT_CA:
        return PlainTextResponse("not found\n", status_code=404)
    return Response(service.ca_cert_der, media_type=PKIX_CERT)


async def cross_cert_endpoint(request: Request) -> Response:
    """The NewWithOld cross certificate (DER) after a rollover: the current CA certified by
    the previous one, for clients that still trust only the previous root."""
    service = service_of(request, None)
    if service is None or service.cross_cert_der is None:
        return PlainTextResponse("no cross certificate\n", status_code=404)
    return Response(service.cross_cert_der, media_type=PKIX_CERT)


class _Seen:
    """What a request has shown of itself by the time it is answered (metric labels)."""

    __slots__ = ("kind", "profile")

    def __init__(self) -> None:
        self.kind, self.profile = "unknown", ""


async def scep_endpoint(request: Request) -> Response:
    """/scep, /scep/<profile path> and /cgi-bin/pkiclient.exe, counted and timed."""
    metrics: Metrics = request.state.metrics
    started = time.perf_counter()
    seen = _Seen()
    try:
        response = await _scep(request, seen, metrics)
    except Exception as exc:
        status = status_of(exc)
        outcome = "overloaded" if isinstance(exc, HsmBusy) else "http_error"
        if isinstance(exc, StoreError):
            metrics.store_error("request")
        metrics.answered(seen.kind, seen.profile, outcome, "", str(status))
        metrics.latency(seen.kind, started)
        raise
    metrics.latency(seen.kind, started)
    return response


async def _scep(request: Request, seen: _Seen, metrics: Metrics) -> Response:
    if request.method not in ("GET", "POST"):
        metrics.answered(seen.kind, seen.profile, "http_error", "", "405")
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
    seen.profile = profile.name
    service: ScepService = request.state.services[profile.ca]
    if operation in OPERATIONS:
        seen.kind = operation
    if operation == "GetCACaps":
        metrics.answered(operation, profile.name, "success", "", "200")
        return Response(service.ca_caps(profile), media_type="text/plain")
    if operation == "GetCACert":
        # Any message= value is fine: CA identifiers, "default", Apple instance names.
        metrics.answered(operation, profile.name, "success", "", "200")
        return Response(service.ca_cert_body, media_type=service.ca_cert_type)
    if operation == "GetNextCACert":
        body = await service.next_ca_cert()
        if body is None:
            metrics.answered(operation, profile.name, "http_error", "", "404")
            return PlainTextResponse("no next CA certificate\n", status_code=404)
        metrics.answered(operation, profile.name, "success", "", "200")
        return Response(body, media_type=NEXT_CA_CERT)
    if operation != "PKIOperation":
        raise MessageError(f"unknown operation {operation[:40]!r}")
    client = request.client.host if request.client else "-"
    try:
        der = await _pki_message(request, params)
        pki, outcome = await service.answer(der, client, profile)
    except (MessageError, PayloadTooLarge) as exc:
        # Refused before the signature verified (web/errors.py answers): still audited.
        status = 413 if isinstance(exc, PayloadTooLarge) else 400
        record_http_refusal(profile.name, client, status, str(exc))
        raise
    seen.kind = MESSAGE_TYPES.get(pki.message_type, "unknown")
    metrics.pki(seen.kind, outcome.profile or profile.name, profile.ca, outcome)
    return Response(outcome.response, media_type=PKI_MESSAGE)


async def _pki_message(request: Request, params: dict[bytes, list[bytes]]) -> bytes:
    """The pkiMessage of a POST body or of a GET message= parameter."""
    if request.method == "POST":
        return await _read_body(request, request.state.max_body)
    messages = params.get(b"message", [])
    if len(messages) != 1:
        raise MessageError("PKIOperation over GET needs exactly one message parameter")
    if len(messages[0]) > request.state.max_body * 2:
        raise PayloadTooLarge("message parameter too large")
    return decode_message_param(messages[0])


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
