"""One-time enrollment challenges: generation, hashing and pattern checks (pure logic, no I/O).

A challenge value is shown once to whoever issued it and never stored or logged; the store keeps
its SHA-256. A challenge can be bound to a subject pattern (fullmatch on the RFC 4514 subject)
and a SAN pattern (fullmatch on every SAN as "TYPE:value", e.g. "DNS:host.example").
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from hsmscep.errors import MessageError

CHALLENGE_BYTES = 24  # token_urlsafe(24): 32 characters, 192 bits
DEFAULT_TTL = timedelta(hours=1)
MAX_TTL = timedelta(days=30)


class InvalidChallengeRequest(MessageError):
    """A field of a request to issue a one-time challenge is invalid; the message names it
    (HTTP 400 from the admin API, exit 2 from the CLI, ConfigError when read from settings)."""


def new_challenge() -> str:
    """A fresh random challenge; printable, so clients may send it as PrintableString."""
    return secrets.token_urlsafe(CHALLENGE_BYTES)


def challenge_hash(value: bytes | str) -> str:
    """The SHA-256 (hex) under which a challenge is stored and looked up."""
    raw = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(raw).hexdigest()


def compile_pattern(pattern: str | None, what: str) -> re.Pattern[str] | None:
    """Compile a subject/SAN pattern; InvalidChallengeRequest naming `what` if it is not a
    valid regular expression."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InvalidChallengeRequest(f"{what} is not a valid regular expression: {exc}") from exc


def check_ttl(ttl_seconds: int) -> timedelta:
    """A requested TTL as a timedelta; InvalidChallengeRequest if not within 1 s .. MAX_TTL."""
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int):
        raise InvalidChallengeRequest("ttl_seconds must be an integer")
    ttl = timedelta(seconds=ttl_seconds)
    if ttl_seconds < 1 or ttl > MAX_TTL:
        most = int(MAX_TTL.total_seconds())
        raise InvalidChallengeRequest(f"ttl_seconds must be between 1 and {most}")
    return ttl


def expiry(now: datetime, ttl: timedelta) -> datetime:
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now + ttl


def binding_mismatch(
    subject: str, sans: Iterable[str], subject_pattern: str | None, san_pattern: str | None
) -> str | None:
    """Why a CSR's subject/SANs do not fit the challenge's binding, or None if they do."""
    subject_re = compile_pattern(subject_pattern, "subject_pattern")
    if subject_re is not None and subject_re.fullmatch(subject) is None:
        return "subject does not match the challenge's subject pattern"
    san_re = compile_pattern(san_pattern, "san_pattern")
    if san_re is not None:
        for san in sans:
            if san_re.fullmatch(san) is None:
                return "a SAN does not match the challenge's SAN pattern"
    return None
