"""A failing store neither floods the log nor spends the CA key: the real app and SQLite file
in process (tests/inprocess.py), the database broken under it and repaired again."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmscep.logs import Throttled
from hsmscep.service.health import PROBE_SECONDS
from hsmscep.testing import client
from tests.inprocess import serve, soft_ca

KEY = rsa.generate_private_key(65537, 2048)


def test_store_outage_costs_no_signatures_and_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="hsmscep.web.errors")
    ca = soft_ca(tmp_path, "store-fault-ca")
    database = tmp_path / "hsmscep.db"
    with serve(ca) as http:
        certs = client.parse_ca_certs(http.get("/scep?operation=GetCACert").content)

        def enroll(cn: str) -> int:
            request = client.build_pkcs_req(
                key=KEY,
                ca_certs=certs,
                challenge=ca.challenge,
                subject=x509.Name.from_rfc4514_string(f"CN={cn}"),
            )
            response = http.post(
                "/scep?operation=PKIOperation",
                content=request.der,
                headers={"Content-Type": "application/x-pki-message"},
            )
            if response.status_code == 503:
                assert response.headers["retry-after"] == "1"
                assert response.text == "temporarily unavailable\n"
            return response.status_code

        assert enroll("before") == 200
        with sqlite3.connect(database) as db:
            (schema,) = db.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'certificates'"
            ).fetchone()
            db.execute("ALTER TABLE certificates RENAME TO certificates_away")
        signed = ca.keys.ca_signatures
        statuses = [enroll(f"outage-{i}") for i in range(20)]
        assert statuses == [503] * 20
        # The first request found the store failing after its signature; the rest, none.
        assert ca.keys.ca_signatures - signed == 1
        # Past the probe interval, requests make the store take a write first: it fails, so
        # they are refused too, still without a signature.
        for i in range(3):
            time.sleep(PROBE_SECONDS * 1.1)
            assert enroll(f"probe-{i}") == 503
        assert ca.keys.ca_signatures - signed == 1
        lines = [r for r in caplog.records if r.name == "hsmscep.web.errors"]
        assert len(lines) == 1  # one line per interval, not one per request
        with sqlite3.connect(database) as db:
            db.execute("DROP TABLE IF EXISTS certificates")
            db.execute("ALTER TABLE certificates_away RENAME TO certificates")
        assert "certificates" in schema
        # Recovered: after the probe interval the next request goes through (bounded).
        deadline = time.monotonic() + 10 * PROBE_SECONDS
        while enroll("after") != 200:
            assert time.monotonic() < deadline, "the store never counted as recovered"
            time.sleep(PROBE_SECONDS / 4)


def test_throttled_counts_what_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hsmscep.test.throttle")
    throttled = Throttled(logging.getLogger("hsmscep.test.throttle"), interval=3600)
    assert throttled.log(logging.ERROR, "a", "failed: %s", "disk full")
    assert not any(throttled.log(logging.ERROR, "a", "failed: %s", "disk full") for _ in range(9))
    assert throttled.log(logging.ERROR, "b", "other")  # per key
    assert [r.getMessage() for r in caplog.records] == ["failed: disk full", "other"]
    throttled._last["a"] -= 7200  # as if the interval had passed
    assert throttled.log(logging.ERROR, "a", "failed: %s", "disk full")
    assert "(9 more like it in the last" in caplog.records[-1].getMessage()
