"""Structured logs: [log] settings, request ids, the access log, JSON lines from every process
of a real server (SoftHSM2 token, SQLite, uvicorn), and nothing secret in them."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import sys
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmscep import logs
from hsmscep.config.settings import load_settings
from hsmscep.errors import ConfigError
from hsmscep.hsm.pool import SigningPool
from hsmscep.testing import client
from tests.conftest import DevCa, start_server
from tests.inprocess import serve, soft_ca

ADMIN_TOKEN = "admin-token-0123456789-abcdef"


# ---- [log] settings ------------------------------------------------------------------------


def config_with(tmp_path: Path, log: str) -> Path:
    ca = soft_ca(tmp_path, "log-config")
    ca.config.write_text(ca.config.read_text() + f"\n{log}\n")
    return ca.config


def test_log_settings_from_file_and_environment(tmp_path: Path) -> None:
    config = config_with(
        tmp_path,
        '[log]\nformat = "json"\naccess = false\n'
        '[log.levels]\n"hsmscep.audit" = "info"\nuvicorn = "WARNING"\nroot = "ERROR"',
    )
    log = load_settings(config).log
    assert (log.format, log.access, log.level) == ("json", False, "INFO")
    assert dict(log.levels) == {"hsmscep.audit": "INFO", "uvicorn": "WARNING", "root": "ERROR"}
    env = {"HSMSCEP_LOG_FORMAT": "text", "HSMSCEP_LOG_LEVELS": "asyncio=DEBUG, hsmscep=ERROR"}
    log = load_settings(config, env).log
    assert log.format == "text"
    assert dict(log.levels) == {"asyncio": "DEBUG", "hsmscep": "ERROR"}


@pytest.mark.parametrize(
    ("log", "env", "message"),
    [
        ('[log]\nformat = "jsn"', {}, "log.format has value 'jsn'; use text or json; did you mean"),
        ("[log]\naccess = 3", {}, "log.access has value 3; not true or false"),
        ('[log]\ncolour = "no"', {}, "log.colour: unknown key"),
        ('[log.levels]\nuvicorn = "LOUD"', {}, "log.levels.uvicorn has value 'LOUD'"),
        ('[log.levels]\n"a b" = "INFO"', {}, "'a b' is not a logger name"),
        ("", {"HSMSCEP_LOG_LEVELS": "uvicorn"}, "'uvicorn' is not logger=LEVEL"),
        ("", {"HSMSCEP_LOG_FORMATT": "json"}, "HSMSCEP_LOG_FORMATT matches no configuration"),
    ],
)
def test_bad_log_settings_are_refused_clearly(
    tmp_path: Path, log: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(config_with(tmp_path, log), env)


# ---- request ids ---------------------------------------------------------------------------


def test_request_id_echoed_when_sane_else_replaced(tmp_path: Path) -> None:
    ca = soft_ca(tmp_path, "log-ids")
    with serve(ca) as http:
        sane = "3f2c9a1e-7b4d-4c1a-9e2f-0123456789ab"
        assert http.get("/healthz", headers={"X-Request-ID": sane}).headers["x-request-id"] == sane
        for bad in ("a" * 65, "has space", "<script>", ""):
            got = http.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
            assert re.fullmatch("[0-9a-f]{16,}", got), (bad, got)
        first = http.get("/healthz").headers["x-request-id"]
        assert first != http.get("/healthz").headers["x-request-id"]


def test_signing_jobs_run_in_the_requests_context() -> None:
    async def run() -> str | None:
        pool: SigningPool[object] = SigningPool(
            object, size=1, max_pending=2, close_context=lambda _: None
        )
        await pool.start()
        try:
            logs.current_request.set(logs.RequestInfo("job-ctx-1"))
            info = await pool.run(lambda _: logs.current_request.get())
            return info.id if info is not None else None
        finally:
            await pool.aclose()

    assert asyncio.run(run()) == "job-ctx-1"


def test_json_formatter_fields_and_exception() -> None:
    logger = logging.getLogger("hsmscep.test.json")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logger.makeRecord(
            logger.name,
            logging.ERROR,
            __file__,
            1,
            "failed %s",
            ("x",),
            sys.exc_info(),
        )
    token = logs.current_request.set(logs.RequestInfo("rid-7"))
    try:
        logs.RequestFilter().filter(record)
    finally:
        logs.current_request.reset(token)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "failed x" and line["level"] == "ERROR" and line["pid"] > 0
    assert line["logger"] == "hsmscep.test.json" and line["request_id"] == "rid-7"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert "ValueError: boom" in line["exception"]


# ---- a real server in JSON mode ------------------------------------------------------------


WRONG_TOKEN = "wrong-token-9876543210-zyxwvu"


def run_requests(dev_ca: DevCa, log_format: str, workers: int) -> tuple[str, list[str]]:
    """A server in `log_format`: an enrollment with the challenge (GET, so the pkiMessage is
    in the query), an admin call, one with a wrong token, a broken pkiMessage. Its whole
    output and the secrets that must not be in it."""
    env = {
        "HSMSCEP_LOG_FORMAT": log_format,
        "HSMSCEP_ADMIN_TOKEN_ENV": "LOGTEST_ADMIN_TOKEN",
        "LOGTEST_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    server = start_server(dev_ca, env, args=("--workers", str(workers)))
    try:
        certs = client.parse_ca_certs(httpx.get(f"{server.url}/scep?operation=GetCACert").content)
        request = client.build_pkcs_req(
            key=rsa.generate_private_key(65537, 2048),
            ca_certs=certs,
            challenge=dev_ca.challenge,
            subject=x509.Name.from_rfc4514_string(f"CN={log_format}-log-client"),
        )
        message = base64.b64encode(request.der).decode()
        enrolled = httpx.get(
            f"{server.url}/scep?operation=PKIOperation&message={quote(message, safe='')}",
            headers={"X-Request-ID": "enroll-0001"},
            timeout=30,
        )
        assert enrolled.status_code == 200 and enrolled.headers["x-request-id"] == "enroll-0001"
        admin = httpx.get(
            f"{server.url}/admin/pending",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Request-ID": "admin-0001"},
        )
        assert admin.status_code == 200, admin.text
        refused = httpx.get(
            f"{server.url}/admin/pending",
            headers={"Authorization": f"Bearer {WRONG_TOKEN}", "X-Request-ID": "admin-0002"},
        )
        assert refused.status_code == 401
        bad = httpx.post(
            f"{server.url}/scep?operation=PKIOperation",
            content=b"\x30\x03\x02\x01\x00",
            headers={"X-Request-ID": "bad-0001"},
        )
        assert bad.status_code == 400
    finally:
        assert server.stop() == 0
    pin = (dev_ca.directory / "pin").read_text().strip()
    secrets = [dev_ca.challenge, pin, ADMIN_TOKEN, WRONG_TOKEN, message, quote(message)]
    return server.output(), secrets


def test_text_logs_of_a_real_server_tag_requests_and_hold_no_secret(dev_ca: DevCa) -> None:
    output, secrets = run_requests(dev_ca, "text", workers=1)
    assert re.search(r" INFO \[enroll-0001\] hsmscep\.audit \{.*\"decision\": \"issued\"", output)
    assert re.search(
        r" INFO \[enroll-0001\] hsmscep\.access GET /scep 200 .* PKIOperation 19", output
    )
    assert " WARNING [admin-0002] hsmscep.web.admin admin authentication failed" in output
    for secret in secrets:
        assert secret not in output, f"a secret is in the log: {secret[:12]}..."


def test_json_logs_of_a_real_server_tie_requests_and_hold_no_secret(dev_ca: DevCa) -> None:
    output, secrets = run_requests(dev_ca, "json", workers=2)
    lines = [json.loads(line) for line in output.splitlines()]  # every line is JSON
    assert all({"time", "level", "logger", "message", "pid"} <= line.keys() for line in lines)
    assert {"uvicorn.error", "hsmscep.access", "hsmscep.audit"} <= {x["logger"] for x in lines}
    # The supervisor and both workers: three processes, each logging JSON.
    assert len({x["pid"] for x in lines}) >= 3, {x["pid"] for x in lines}

    def of(request_id: str, logger: str) -> list[dict[str, object]]:
        return [x for x in lines if x.get("request_id") == request_id and x["logger"] == logger]

    (access,) = of("enroll-0001", "hsmscep.access")
    (audit,) = of("enroll-0001", "hsmscep.audit")
    assert audit["data"]["decision"] == "issued", audit  # type: ignore[index]
    data = access["data"]
    assert isinstance(data, dict)
    assert (data["method"], data["path"], data["status"]) == ("GET", "/scep", 200)
    assert (data["operation"], data["message_type"]) == ("PKIOperation", "19")
    assert access["pid"] == audit["pid"]
    assert [x["data"]["status"] for x in of("admin-0001", "hsmscep.access")] == [200]  # type: ignore[index]
    assert [x["data"]["status"] for x in of("admin-0002", "hsmscep.access")] == [401]  # type: ignore[index]
    # An error line of a request carries its id too.
    (failed,) = of("admin-0002", "hsmscep.web.admin")
    assert failed["level"] == "WARNING" and "authentication failed" in str(failed["message"])
    (invalid,) = of("bad-0001", "hsmscep.audit")
    assert invalid["data"]["decision"] == "invalid"  # type: ignore[index]
    for secret in secrets:
        assert secret not in output, f"a secret is in the log: {secret[:12]}..."
