"""The webhook HTTP edge: signed POSTs to authorization and notification webhooks.

The only module that imports httpx for outgoing calls. What is sent and how answers are read
is hsmscep.policy.webhook. Log lines (logger `hsmscep.webhook.client`, JSON) name the profile,
transactionID, the webhook's origin (scheme, host, port) and what failed; never the challenge,
the secret or the URL's path/query.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from hsmscep.errors import WebhookError
from hsmscep.policy.webhook import (
    MAX_ANSWER_BYTES,
    AuthorizationRequest,
    Decision,
    WebhookConfig,
    _json,
    parse_answer,
    signature_headers,
)

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 100  # notifications; beyond that new ones are dropped (and logged)
CLOSE_GRACE = 2.0  # seconds aclose() waits for notifications still in flight


def _origin(url: str) -> str:
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}"


def _failure(exc: Exception) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connection failed"
    if isinstance(exc, WebhookError):
        return str(exc)
    return f"transport failure ({type(exc).__name__})"


class WebhookClient:
    """The HTTP edge: signed POSTs to webhooks; one httpx client per trusted-CA setting.

    Use inside the event loop (`async with WebhookClient() as hooks:`) and close with aclose().
    """

    def __init__(
        self,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        """`observe(result, seconds)`: each authorization call's result (allowed, denied,
        error, timeout) and latency, for the metrics."""
        self._observe = observe
        self._clients: dict[Path | None, httpx.AsyncClient] = {}
        self._in_flight: set[asyncio.Task[None]] = set()
        self._max_in_flight = max_in_flight
        self._closed = False

    async def __aenter__(self) -> WebhookClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def authorize(self, config: WebhookConfig, request: AuthorizationRequest) -> Decision:
        """Ask the webhook; a timeout, failure or invalid answer decides by config.on_error."""
        if self._closed:
            raise RuntimeError("WebhookClient is closed")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(config.timeout):
                status, body = await self._post(config, request.to_json(), read=True)
            decision = parse_answer(status, body)
        except (TimeoutError, httpx.HTTPError, OSError, WebhookError) as exc:
            failure = _failure(exc)
        else:
            if self._observe is not None:
                result = "allowed" if decision.allowed else "denied"
                self._observe(result, time.perf_counter() - started)
            return decision
        if self._observe is not None:
            result = "timeout" if failure == "timeout" else "error"
            self._observe(result, time.perf_counter() - started)
        log.warning(
            _json(
                {
                    "event": "webhook_error",
                    "profile": request.profile,
                    "transaction_id": request.transaction_id,
                    "webhook": _origin(config.url),
                    "error": failure,
                    "decision": config.on_error,
                }
            ).decode()
        )
        return Decision(allowed=config.on_error == "allow", reason=f"webhook error: {failure}")

    def notify(self, config: WebhookConfig, event: Mapping[str, Any]) -> None:
        """Send `event` as JSON in a background task (call it from the event loop); returns at
        once and never raises."""
        # The challenge never leaves in a notification, whatever the caller put in the event.
        payload = {key: value for key, value in event.items() if key != "challenge"}
        labels = {k: str(payload.get(k)) for k in ("event", "profile", "transaction_id")}
        labels["webhook"] = _origin(config.url)
        if self._closed or len(self._in_flight) >= self._max_in_flight:
            log.warning(_json({"event": "notify_dropped", "notification": labels}).decode())
            return
        try:
            body = _json(payload)
        except (TypeError, ValueError):
            log.warning(_json({"event": "notify_unserializable", "notification": labels}).decode())
            return
        task = asyncio.create_task(self._deliver(config, body, labels))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def aclose(self, grace: float = CLOSE_GRACE) -> None:
        """Wait up to `grace` seconds for notifications in flight, cancel the rest, close."""
        self._closed = True
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                log.warning(_json({"event": "notify_cancelled", "count": len(pending)}).decode())
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def _deliver(self, config: WebhookConfig, body: bytes, labels: dict[str, str]) -> None:
        try:
            async with asyncio.timeout(config.timeout):
                status, _ = await self._post(config, body, read=False)
            if 200 <= status < 300:
                return
            failure = f"HTTP {status}"
        except (TimeoutError, httpx.HTTPError, OSError) as exc:
            failure = _failure(exc)
        log.warning(
            _json({"event": "notify_failed", "notification": labels, "error": failure}).decode()
        )

    async def _post(self, config: WebhookConfig, body: bytes, *, read: bool) -> tuple[int, bytes]:
        """POST the signed body; the answer's body only for a 2xx and when `read`, bounded."""
        headers = {
            "Content-Type": "application/json",
            # A compressed answer could inflate far beyond the cap before we could count it.
            "Accept-Encoding": "identity",
            "User-Agent": "hsmscep",
            **signature_headers(config.secret, body, int(time.time())),
        }
        client = self._http(config.ca_file)
        async with client.stream(
            "POST", config.url, content=body, headers=headers, timeout=config.timeout
        ) as response:
            status = response.status_code
            if not read or not 200 <= status < 300:
                return status, b""
            if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                raise WebhookError("answer has a Content-Encoding")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise WebhookError(f"answer larger than {MAX_ANSWER_BYTES} bytes")
                chunks.append(chunk)
            return status, b"".join(chunks)

    def _http(self, ca_file: Path | None) -> httpx.AsyncClient:
        client = self._clients.get(ca_file)
        if client is None:
            verify: ssl.SSLContext | bool = True
            if ca_file is not None:
                verify = httpx.create_ssl_context(trust_env=False)
                verify.load_verify_locations(cafile=str(ca_file))
            client = httpx.AsyncClient(verify=verify, follow_redirects=False, trust_env=False)
            self._clients[ca_file] = client
        return client
