"""Issuing one-time enrollment challenges into the store: the admin API and the CLI share it.

The value is returned once to the caller and never stored or logged; the store keeps its
SHA-256, and the server consumes it atomically when a CSR carries it (authorization.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hsmscep.errors import UnknownProfile
from hsmscep.policy.challenges import (
    InvalidChallengeRequest,
    challenge_hash,
    check_ttl,
    compile_pattern,
    expiry,
    new_challenge,
)
from hsmscep.policy.profiles import Profiles
from hsmscep.service.ports import ChallengeStore
from hsmscep.store.records import OneTimeChallenge


async def issue_challenge(
    store: ChallengeStore,
    profiles: Profiles,
    profile_name: object,
    *,
    ttl_seconds: object = None,
    subject_pattern: object = None,
    san_pattern: object = None,
    now: datetime | None = None,
) -> tuple[str, OneTimeChallenge]:
    """A fresh challenge for a profile whose challenge_mode is "one_time".

    UnknownProfile for an unknown name; InvalidChallengeRequest (a MessageError; the message
    says which field) for a profile in another mode, a bad TTL or a pattern that is not a
    regular expression.
    """
    if not isinstance(profile_name, str):
        raise InvalidChallengeRequest("profile must be a string")
    profile = profiles.get(profile_name)
    if profile is None:
        raise UnknownProfile(f"no enrollment profile {profile_name!r}")
    if profile.challenge_mode != "one_time":
        raise InvalidChallengeRequest(
            f"profile {profile.name!r} does not use one-time challenges"
            f" (its challenge_mode is {profile.challenge_mode!r})"
        )
    if ttl_seconds is None:
        ttl: timedelta = profile.challenge_ttl
    elif isinstance(ttl_seconds, int):
        ttl = check_ttl(ttl_seconds)
    else:
        raise InvalidChallengeRequest("ttl_seconds must be an integer")
    patterns: list[str | None] = []
    for what, pattern in (("subject_pattern", subject_pattern), ("san_pattern", san_pattern)):
        if pattern is not None and not isinstance(pattern, str):
            raise InvalidChallengeRequest(f"{what} must be a string")
        compile_pattern(pattern, what)
        patterns.append(pattern)
    created = now or datetime.now(UTC)
    value = new_challenge()
    challenge = OneTimeChallenge(
        hash=challenge_hash(value),
        created_at=created,
        expires_at=expiry(created, ttl),
        subject_pattern=patterns[0],
        san_pattern=patterns[1],
        profile=profile.name,
    )
    await store.add_challenge(challenge)
    return value, challenge


def challenge_json(challenge: OneTimeChallenge) -> dict[str, Any]:
    """What the admin API and `hsmscep challenge issue --json` show besides the value."""
    return {
        "profile": challenge.profile,
        "created_at": challenge.created_at.isoformat(),
        "expires_at": challenge.expires_at.isoformat(),
        "subject_pattern": challenge.subject_pattern,
        "san_pattern": challenge.san_pattern,
    }


def challenge_record(challenge: OneTimeChallenge, by: str) -> dict[str, Any]:
    """The audit line of an issued challenge: never its value, nor its hash."""
    return {"event": "challenge_issued", "by": by} | challenge_json(challenge)
