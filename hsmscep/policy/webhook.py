"""Authorization and notification webhooks for enrollment profiles: the wire format. No I/O.

A profile with a webhook challenge policy asks an HTTP(S) endpoint whether to issue; a profile
with a notification webhook tells an endpoint what was issued or denied. This module holds the
pure parts (settings, request body, signature, answer parsing); hsmscep.config.webhook reads
the settings and hsmscep.webhook.client is the one `httpx` edge.

Configuration (paths relative to the config file; the secret is never written inline):

    [profiles.wifi.webhook]
    url = "https://authz.example.com/scep"   # http:// or https:// only, no user:password@
    secret_env = "WIFI_WEBHOOK_SECRET"       # or secret_file = "wifi-webhook.secret"
    timeout_seconds = 5                      # total per request, connect included; 0 < t <= 60
    on_error = "deny"                        # or "allow": decision when the webhook fails
    ca_file = "authz-ca.pem"                 # optional, https only: extra trusted CA certificates

    [profiles.wifi.notify]                   # same keys except on_error
    url = "https://events.example.com/scep"
    secret_file = "notify.secret"

The secret is at least 16 bytes (a secret_file is read as bytes, surrounding whitespace stripped;
a secret_env value is taken as is, UTF-8 encoded). Proxy variables, .netrc and SSL_CERT_FILE
from the environment are not used; redirects are never followed.

Authorization request: `POST <url>` with `Content-Type: application/json` and this body (UTF-8,
keys sorted, no whitespace; shown indented here):

    {
      "challenge": "s3cret-from-the-csr",      // null when the CSR has none
      "client_ip": "192.0.2.10",
      "key": "RSA 2048",                       // or "EC P-256", ...
      "message_type": "19",                    // SCEP messageType: 19 PKCSReq, 17 RenewalReq
      "profile": "wifi",
      "sans": ["DNS:laptop.example.com", "IP:10.0.0.7", "email:a@example.com",
               "URI:urn:x", "UPN:user@corp.example"],
      "subject": "CN=laptop,O=Example",        // RFC 4514
      "transaction_id": "5B1F..."
    }

Answer: HTTP 2xx with a JSON object (at most 64 KiB, no Content-Encoding):

    {"allow": true}
    {"allow": false, "reason": "device not enrolled in MDM"}
    {"allow": true, "reason": "ok", "subject": "CN=laptop-7,O=Example",
     "sans": ["DNS:laptop-7.corp.example"], "validity_days": 30}

`allow` (boolean) is required. Optional: `reason` (string; control characters removed, cut to
200 characters, as it goes into logs), and only with `"allow": true` the overrides `subject`
(RFC 4514 string), `sans` (1 to 64 "TYPE:value" strings, TYPE one of DNS, IP, email, URI, UPN;
they replace the CSR's SANs) and `validity_days` (integer, 1 to 36500). A `null` value counts
as absent. A denial is a 2xx answer with `"allow": false`: anything else -- a non-2xx status
(a 403 too, and redirects), a timeout, a connection or TLS failure, a body that is not such an
object, an unknown key, a wrong type, an unknown SAN type -- is an error, and `on_error` decides
(deny by default) with the reason "webhook error: <what happened>".

Notification: `POST <notify url>`, signed the same way, sent in the background once the SCEP
answer is decided (never delaying it; at most 100 in flight, further ones are dropped and
logged; no retries; the answer is ignored except for a log line when it is not 2xx). The body
is the event the service passes, as JSON with sorted keys, for example:

    {"client": "192.0.2.10", "decision": "issued", "event": "issued", "message_type": "19",
     "outcome": "SUCCESS", "profile": "wifi", "serial": "3f2a...", "subject": "CN=laptop",
     "time": "2026-03-01T12:30:15+00:00", "transaction_id": "5B1F..."}

`event` is "issued" or "denied" (then without `serial`). A notification never carries the
challenge: a "challenge" key in the event is dropped before sending.

Signature: every request carries

    X-Hsmscep-Timestamp: 1767225600
    X-Hsmscep-Signature: t=1767225600,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>

A receiver reads the raw body bytes (before any JSON parsing), takes `t` and `v1` from the
signature header, recomputes the HMAC over `str(t) + "." + body` with the shared secret,
compares in constant time, and refuses timestamps more than 5 minutes from its own clock (the
replay window; a receiver that must not act twice on one request can also remember the
signatures it saw within that window). In Python:

    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    expected = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    ok = hmac.compare_digest(expected, v1) and abs(time.time() - int(t)) <= 300

Log lines (logger `hsmscep.webhook.client`, JSON) name the profile, transactionID, the webhook's
origin (scheme, host, port) and what failed; never the challenge, the secret or the URL's
path/query.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from asn1crypto import core
from cryptography import x509

from hsmscep.errors import WebhookError
from hsmscep.policy.names import UPN_OID
from hsmscep.policy.template import MAX_SANS, MAX_VALIDITY_DAYS

DEFAULT_TIMEOUT = 5.0
MAX_ANSWER_BYTES = 64 * 1024
MAX_REASON_CHARS = 200
TIMESTAMP_HEADER = "X-Hsmscep-Timestamp"
SIGNATURE_HEADER = "X-Hsmscep-Signature"
_ANSWER_KEYS = frozenset({"allow", "reason", "subject", "sans", "validity_days"})


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """Where and how to call one webhook (authorization or notification)."""

    url: str
    secret: bytes = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT
    on_error: Literal["deny", "allow"] = "deny"  # authorization only
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """What the authorization webhook is told about one certificate request."""

    profile: str
    transaction_id: str
    subject: str  # RFC 4514
    sans: tuple[str, ...]  # "TYPE:value", as hsmscep.policy.issuance.describe_sans gives them
    key: str  # e.g. "RSA 2048"
    challenge: str | None = field(repr=False)
    client_ip: str
    message_type: str  # SCEP messageType as sent: "19" PKCSReq, "17" RenewalReq

    def to_json(self) -> bytes:
        """The request body: UTF-8 JSON, keys sorted, no whitespace."""
        return _json(
            {
                "profile": self.profile,
                "transaction_id": self.transaction_id,
                "subject": self.subject,
                "sans": list(self.sans),
                "key": self.key,
                "challenge": self.challenge,
                "client_ip": self.client_ip,
                "message_type": self.message_type,
            }
        )


def signature_headers(secret: bytes, body: bytes, timestamp: int) -> dict[str, str]:
    """The headers that let the receiver authenticate `body` (HMAC-SHA256 over "<t>.<body>")."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: f"t={timestamp},v1={mac}"}


@dataclass(frozen=True, slots=True)
class Decision:
    """The webhook's verdict; overrides (None: keep the CSR's) apply only when allowed."""

    allowed: bool
    reason: str
    subject: x509.Name | None = None
    sans: x509.SubjectAlternativeName | None = None
    validity: timedelta | None = None


def parse_answer(status_code: int, body: bytes) -> Decision:
    """The decision in a webhook's answer; WebhookError if the answer is not a valid one."""
    if 300 <= status_code < 400:
        raise WebhookError(f"HTTP {status_code} (redirects are not followed)")
    if not 200 <= status_code < 300:
        raise WebhookError(f"HTTP {status_code}")
    if len(body) > MAX_ANSWER_BYTES:
        raise WebhookError(f"answer larger than {MAX_ANSWER_BYTES} bytes")
    try:
        answer = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise WebhookError("answer is not JSON") from None
    if not isinstance(answer, dict):
        raise WebhookError("answer is not a JSON object")
    unknown = sorted(set(answer) - _ANSWER_KEYS)
    if unknown:
        raise WebhookError(f"unknown key {clean_text(unknown[0], 40)!r} in the answer")
    allowed = answer.get("allow")
    if not isinstance(allowed, bool):
        raise WebhookError('"allow" must be true or false')
    reason = answer.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise WebhookError('"reason" must be a string')
    subject, sans, days = answer.get("subject"), answer.get("sans"), answer.get("validity_days")
    if not allowed and (subject, sans, days) != (None, None, None):
        raise WebhookError("a denial cannot carry overrides")
    text = clean_text(reason) if reason else ""
    return Decision(
        allowed=allowed,
        reason=text or ("allowed by webhook" if allowed else "denied by webhook"),
        subject=None if subject is None else _subject(subject),
        sans=None if sans is None else _sans(sans),
        validity=None if days is None else _validity(days),
    )


def clean_text(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text` fit for a log line: control/format characters become spaces, cut to `limit`."""
    head = text[: limit * 4]
    spaced = "".join(" " if unicodedata.category(ch)[0] in "CZ" else ch for ch in head)
    return " ".join(spaced.split())[:limit]


def _subject(value: Any) -> x509.Name:
    if not isinstance(value, str) or not value.strip():
        raise WebhookError('"subject" must be a non-empty RFC 4514 string')
    try:
        return x509.Name.from_rfc4514_string(value)
    except ValueError:
        raise WebhookError('"subject" is not a valid RFC 4514 name') from None


def _sans(value: Any) -> x509.SubjectAlternativeName:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SANS:
        raise WebhookError(f'"sans" must be a list of 1 to {MAX_SANS} strings')
    return x509.SubjectAlternativeName([_san(item) for item in value])


def _san(item: Any) -> x509.GeneralName:
    if not isinstance(item, str) or ":" not in item:
        raise WebhookError('every entry of "sans" must be a "TYPE:value" string')
    kind, _, value = item.partition(":")
    kind = kind.lower()
    if kind not in ("dns", "ip", "email", "uri", "upn"):
        raise WebhookError(f"unknown SAN type {clean_text(kind, 20)!r} in the answer")
    if kind == "upn":
        if not value or not value.isprintable():
            raise WebhookError("invalid UPN SAN in the answer")
        return x509.OtherName(UPN_OID, core.UTF8String(value).dump())
    # cryptography wants A-labels and ASCII addresses; IDNs must come punycode-encoded.
    if not value or not value.isascii() or not value.isprintable() or " " in value:
        raise WebhookError(f"invalid {kind.upper()} SAN in the answer")
    if kind == "dns":
        return x509.DNSName(value)
    if kind == "email":
        return x509.RFC822Name(value)
    if kind == "uri":
        return x509.UniformResourceIdentifier(value)
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        raise WebhookError("invalid IP SAN in the answer") from None


def _validity(value: Any) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WebhookError('"validity_days" must be an integer')
    if not 1 <= value <= MAX_VALIDITY_DAYS:
        raise WebhookError(f'"validity_days" must be from 1 to {MAX_VALIDITY_DAYS}')
    return timedelta(days=value)


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
