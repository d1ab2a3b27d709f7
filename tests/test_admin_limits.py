"""The admin API under guessing and flooding: failed authentications logged (address and
endpoint, never the token) and limited per client address; challenge issuing limited too.
The real app in process (tests/inprocess.py); the limiter's clock is driven directly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hsmscep.web import admin
from hsmscep.web.ratelimit import MAX_CLIENTS, RateLimit
from tests.inprocess import serve, soft_ca

TOKEN = "limits-admin-token-0123456789"
WRONG = "wrong-admin-token-9876543210"
CONFIG = """
[admin]
token_file = "admin-token"

[profiles.otp]
challenge_mode = "one_time"
"""
ISSUE = {"profile": "otp"}


@pytest.fixture
def http(tmp_path: Path) -> Iterator[httpx.Client]:
    (tmp_path / "admin-token").write_text(TOKEN + "\n")
    ca = soft_ca(tmp_path, "limits-ca", extra_config=CONFIG)
    with serve(ca) as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_failed_authentications_are_logged_and_limited(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="hsmscep.web.admin")
    statuses = [
        http.get("/admin/pending", headers=bearer(WRONG)).status_code
        for _ in range(admin.FAILED_AUTH_BURST)
    ]
    assert statuses == [401] * admin.FAILED_AUTH_BURST
    limited = http.get("/admin/pending", headers=bearer(WRONG))
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= admin.FAILED_AUTH_INTERVAL
    # While limited, even the right token waits: guessing cannot go on at full speed.
    assert http.get("/admin/pending", headers=bearer(TOKEN)).status_code == 429
    assert http.post("/admin/challenges", headers=bearer(TOKEN), json=ISSUE).status_code == 429
    lines = [r.getMessage() for r in caplog.records if r.name == "hsmscep.web.admin"]
    assert len(lines) == admin.FAILED_AUTH_BURST  # one per failure, none per limited request
    assert all("127.0.0.1" in line and "GET /admin/pending" in line for line in lines)
    assert TOKEN not in caplog.text and WRONG not in caplog.text


def test_challenge_issuing_is_limited_per_client(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    # Bounded; the limit refills one a second, so a slow box may get a few more than the burst.
    issued: list[httpx.Response] = []
    while len(issued) < 3 * admin.ISSUE_BURST:
        issued.append(http.post("/admin/challenges", headers=bearer(TOKEN), json=ISSUE))
        if issued[-1].status_code != 201:
            break
    limited = issued.pop()
    assert len(issued) >= admin.ISSUE_BURST
    assert all(r.status_code == 201 for r in issued)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert "challenge issuing limited for client 127.0.0.1" in caplog.text
    # Other endpoints are not affected by the issuing limit.
    assert http.get("/admin/pending", headers=bearer(TOKEN)).status_code == 200


def test_rate_limit_refills_and_stays_bounded() -> None:
    now = [0.0]
    limit = RateLimit(burst=3, interval=10.0, clock=lambda: now[0])
    assert [limit.take("a") for _ in range(4)] == [0, 0, 0, 10]
    assert limit.take("b") == 0  # per client
    now[0] = 15.0
    assert limit.take("a") == 0 and limit.take("a") == 5
    for i in range(MAX_CLIENTS + 50):
        limit.spend(f"client-{i}")
    assert len(limit._buckets) <= MAX_CLIENTS
