"""One-time challenges in the store: hashed, consumed atomically, expiry (real SQLite files)."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hsmscep.store.records import OneTimeChallenge
from hsmscep.store.sqlite import CertStore


def test_challenge_consumed_exactly_once_under_concurrency(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"secret-value").hexdigest()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    async def scenario() -> None:
        store = await CertStore.open(tmp_path / "c.sqlite3")
        try:
            await store.add_challenge(
                OneTimeChallenge(
                    hash=digest,
                    created_at=t0,
                    expires_at=t0 + timedelta(hours=1),
                    subject_pattern="CN=.*",
                )
            )
            stored = await store.get_challenge(digest)
            assert stored is not None and stored.used_at is None
            assert stored.subject_pattern == "CN=.*" and stored.san_pattern is None
            results = await asyncio.gather(
                *(store.consume_challenge(digest, t0, f"tid-{i}") for i in range(20))
            )
            assert results.count(True) == 1
            used = await store.get_challenge(digest)
            assert used is not None and used.used_at == t0
            assert await store.get_challenge(digest, profile="other") is None
            assert not await store.consume_challenge("0" * 64, t0, "x")
        finally:
            await store.close()

    asyncio.run(scenario())


def test_expired_challenge_is_not_consumed(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"late").hexdigest()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    async def scenario() -> None:
        store = await CertStore.open(tmp_path / "e.sqlite3")
        try:
            await store.add_challenge(
                OneTimeChallenge(hash=digest, created_at=t0, expires_at=t0 + timedelta(1))
            )
            assert not await store.consume_challenge(digest, t0 + timedelta(days=1), "t")
            assert await store.consume_challenge(digest, t0 + timedelta(hours=23), "t")
        finally:
            await store.close()

    asyncio.run(scenario())


def test_pure_challenge_helpers() -> None:
    import pytest

    from hsmscep.policy import challenges

    a, b = challenges.new_challenge(), challenges.new_challenge()
    assert a != b and len(a) == 32
    assert challenges.challenge_hash(a) == challenges.challenge_hash(a.encode())
    assert challenges.check_ttl(60) == timedelta(seconds=60)
    for bad in (0, -1, 10**9):
        with pytest.raises(challenges.InvalidChallengeRequest, match="ttl_seconds"):
            challenges.check_ttl(bad)
    with pytest.raises(challenges.InvalidChallengeRequest, match="subject_pattern"):
        challenges.compile_pattern("(", "subject_pattern")
    match = challenges.binding_mismatch
    assert match("CN=dev1,O=Acme", ["DNS:dev1.acme"], r"CN=dev\d+,O=Acme", r"DNS:.*\.acme") is None
    assert match("CN=evil", [], r"CN=dev\d+", None) is not None
    assert match("CN=dev1", ["DNS:x.other"], None, r"DNS:.*\.acme") is not None
    assert match("CN=anything", ["IP:1.2.3.4"], None, None) is None
