"""The one map from the hsmscep error tree to HTTP answers (Starlette exception handlers).

Handlers raise; this module decides status, body and headers. Client-caused errors carry
their own text (written to be shown); HSM and store failures are logged here and answered
with a fixed 503 and Retry-After, never with the internal exception text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ExceptionHandler

from hsmscep.errors import (
    HsmBusy,
    HsmError,
    HsmUnavailable,
    MessageError,
    PayloadTooLarge,
    RequestConflict,
    StoreError,
    UnknownCertificate,
    UnknownProfile,
    UnknownRequest,
)
from hsmscep.logs import Throttled

log = logging.getLogger(__name__)
_outages = Throttled(log)

RETRY_AFTER = {"Retry-After": "1"}


async def _disconnected(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("client disconnected\n", status_code=400)


async def _busy(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("busy, retry later\n", status_code=503, headers=RETRY_AFTER)


async def _unavailable(request: Request, exc: Exception) -> Response:
    # An outage fails every request alike: one line per interval, with the count. A token
    # that went away is logged once, when it goes and when it is back (hsm/login.py), not
    # once per request answered meanwhile.
    if isinstance(exc, HsmUnavailable):
        log.debug("%s %s failed: %s", request.method, request.url.path, exc)
    else:
        _outages.log(
            logging.ERROR,
            type(exc).__name__,
            "%s %s failed: %s",
            request.method,
            request.url.path,
            exc,
        )
    return PlainTextResponse("temporarily unavailable\n", status_code=503, headers=RETRY_AFTER)


_STATUS: dict[type[Exception], int] = {
    MessageError: 400,
    PayloadTooLarge: 413,
    UnknownCertificate: 404,
    UnknownRequest: 404,
    UnknownProfile: 404,
    RequestConflict: 409,
}


def _client_error_for(kind: type[Exception]) -> ExceptionHandler:
    async def handler(request: Request, exc: Exception) -> Response:
        # The text of these errors is written to be shown to the client (hsmscep.errors).
        return PlainTextResponse(f"{exc}\n", status_code=_STATUS[kind])

    return handler


def status_of(exc: BaseException) -> int:
    """The HTTP status the handlers below answer `exc` with (500: none of them)."""
    for kind in type(exc).__mro__:
        if kind in _STATUS:
            return _STATUS[kind]
    if isinstance(exc, ClientDisconnect):
        return 400
    return 503 if isinstance(exc, HsmError | StoreError) else 500


# Starlette picks the handler of the closest class in the exception's MRO, so HsmBusy wins
# over HsmError.
EXCEPTION_HANDLERS: Mapping[type[Exception], ExceptionHandler] = {
    **{kind: _client_error_for(kind) for kind in _STATUS},
    ClientDisconnect: _disconnected,
    HsmBusy: _busy,
    HsmError: _unavailable,
    StoreError: _unavailable,
}
