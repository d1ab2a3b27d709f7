"""Prometheus metrics (issue 12): a real `hsmscep serve --workers 2` counted exactly, summed
over both workers and across a SIGHUP restart; the exposition passes promtool; the admin token
and the supervisor's own listener; the pure helpers.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from cryptography import x509
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from hsmscep.config.sections import MetricsSettings, parse_listen
from hsmscep.errors import ConfigError, HsmBusy, MessageError, PayloadTooLarge, StoreError
from hsmscep.hsm.pool import SigningPool
from hsmscep.service.authorization import ALLOW, OneTimeChallenge
from hsmscep.store.records import CrlInfo, CrlStatus
from hsmscep.store.records import OneTimeChallenge as StoredChallenge
from hsmscep.store.sqlite import CertStore
from hsmscep.web import gauges
from hsmscep.web.errors import status_of
from hsmscep.web.scrape import (
    DIR_ENV,
    authorized,
    process_directory,
    supervisor_listener,
    wsgi_app,
)
from hsmscep.web.tally import Spread, Tally
from tests.conftest import DevCa, Server, free_port, make_ca, openssl_serial, start_server
from tests.inprocess import serve, soft_ca
from tests.test_authorization import ONE_TIME, T0, candidate, with_store
from tests.test_enroll import (
    fetch_ca_certs,
    issued_cert,
    new_request,
    open_reply,
    post_pki,
)
from tests.test_pipeline import worker_pids
from tests.test_sighup import wait_for


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


TOKEN = "metrics-admin-token-0123456789"
ENROLLMENTS, WRONG_CHALLENGE, MALFORMED = 8, 2, 2
CLIENTS = 8  # connections held open together: the balancer spreads them over both workers

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every series whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def scrape(url: str, **kwargs: str) -> str:
    response = httpx.get(f"{url}/metrics", headers=kwargs, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


@pytest.fixture(scope="module")
def mca(softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DevCa:
    directory = tmp_path_factory.mktemp("metrics")
    (directory / "admin-token").write_text(TOKEN + "\n")
    extra = '\n[admin]\ntoken_file = "admin-token"\n\n[metrics]\ndirectory = "metrics-dir"\n'
    return make_ca(softhsm_dir, directory, "hsmscep-metrics", extra_config=extra)


@pytest.fixture(scope="module")
def mserver(mca: DevCa) -> Iterator[Server]:
    server = start_server(mca, args=("--workers", "2"))
    try:
        wait_for(lambda: len(worker_pids(server.process.pid)) == 2, "two workers")
        wait_for(lambda: _sampling(mca, worker_pids(server.process.pid)), "both workers ready")
        yield server
    finally:
        code = server.stop()
        assert code == 0, server.output()
    # The supervisor emptied and used the configured directory; it keeps it (not its own).
    assert (mca.directory / "metrics-dir").is_dir()


def _sampling(ca: DevCa, pids: list[int]) -> bool:
    """Each of `pids` has sampled its tokens: its lifespan finished starting."""
    for pid in pids:
        path = ca.directory / "metrics-dir" / f"gauge_livemax_{pid}.db"
        if not path.exists():
            return False
        keys = [key for key, *_ in MmapedDict.read_all_values_from_file(str(path))]
        if not any("hsmscep_hsm_token_up" in key for key in keys):
            return False
    return True


def _per_process_requests(directory: Path) -> dict[int, float]:
    """hsmscep_requests_total per worker process, from prometheus-client's own files."""
    counts: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        values = MmapedDict.read_all_values_from_file(str(path))
        counts[pid] = sum(
            value for key, value, _, _ in values if '"hsmscep_requests"' in key and "_total" in key
        )
    return counts


def test_counters_move_by_exactly_what_was_sent(mca: DevCa, mserver: Server) -> None:
    ca_certs = fetch_ca_certs(mserver.url)
    before = parse(scrape(mserver.url))
    clients = [httpx.Client(timeout=60) for _ in range(CLIENTS)]
    try:
        # Every connection open at once, so that both workers hold some of them.
        for client in clients:
            assert client.get(f"{mserver.url}/healthz").status_code == 200
        serials: list[str] = []
        errors: list[BaseException] = []

        def send(index: int) -> None:
            try:
                client = clients[index]
                request = new_request(ca_certs, mca.challenge, cn=f"metrics-device-{index}")
                cert = issued_cert(post_pki(mserver.url, request.der, client), request, ca_certs)
                serials.append(openssl_serial(cert))
            except BaseException as exc:  # reported below, on the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(ENROLLMENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        for index in range(WRONG_CHALLENGE):
            request = new_request(ca_certs, "not-the-challenge", cn=f"metrics-wrong-{index}")
            result = open_reply(
                post_pki(mserver.url, request.der, clients[index]), request, ca_certs
            )
            assert (result.pki_status, result.fail_info) == ("2", "2")  # FAILURE badRequest
        for index in range(MALFORMED):
            assert post_pki(mserver.url, b"\x30\x03junk", clients[index]).status_code == 400
    finally:
        for client in clients:
            client.close()
    scraped = [scrape(mserver.url)]

    def moved(name: str, **labels: str) -> float:
        after = parse(scraped[-1])
        return total(after, name, **labels) - total(before, name, **labels)

    def settled() -> bool:
        # Each worker moves its counts into the shared files once a second.
        scraped.append(scrape(mserver.url))
        requests = moved("hsmscep_requests_total", message_type="PKCSReq")
        enrollments = moved("hsmscep_enrollments_total")
        return requests == ENROLLMENTS + WRONG_CHALLENGE and enrollments == requests

    wait_for(settled, "both workers' counts", seconds=15)
    text = scraped[-1]
    after = parse(text)
    pkcs = {"message_type": "PKCSReq", "profile": "default"}
    assert moved("hsmscep_requests_total", **pkcs, outcome="success", status="200") == ENROLLMENTS
    failed = moved("hsmscep_requests_total", **pkcs, outcome="failure", fail_info="badRequest")
    assert failed == WRONG_CHALLENGE
    bad = {"message_type": "unknown", "outcome": "http_error", "status": "400"}
    assert moved("hsmscep_requests_total", **bad) == MALFORMED
    enrolled = {"ca": "default", "profile": "default"}
    assert moved("hsmscep_enrollments_total", **enrolled, outcome="issued") == ENROLLMENTS
    assert moved("hsmscep_enrollments_total", **enrolled, outcome="refused") == WRONG_CHALLENGE
    sent = ENROLLMENTS + WRONG_CHALLENGE
    assert moved("hsmscep_request_duration_seconds_count", message_type="PKCSReq") == sent
    assert moved("hsmscep_store_commit_batch_size_sum") == ENROLLMENTS
    # At least: the startup probes of a worker may still be counted.
    assert moved("hsmscep_hsm_operation_seconds_count", operation="decrypt") >= sent
    assert moved("hsmscep_hsm_operation_seconds_count", operation="sign_certificate") >= ENROLLMENTS
    assert moved("hsmscep_hsm_operation_seconds_count", operation="sign_reply") >= sent
    assert moved("hsmscep_hsm_queue_seconds_count") >= sent
    # Facts every worker sets: one series each, not one per process.
    assert total(after, "hsmscep_build_info") == 1
    assert total(after, "hsmscep_hsm_token_up") == 1
    not_after = x509.load_pem_x509_certificate(
        mca.settings.ca.cert.read_bytes()
    ).not_valid_after_utc
    ca_expiry = total(after, "hsmscep_certificate_not_after_timestamp_seconds", role="ca")
    assert ca_expiry == not_after.timestamp()
    # Both workers served (each has its own file), and the sum is what was sent.
    per_process = _per_process_requests(mca.directory / "metrics-dir")
    workers = worker_pids(mserver.process.pid)
    assert all(per_process.get(pid, 0) > 0 for pid in workers), (per_process, workers)
    assert sum(per_process.values()) == total(after, "hsmscep_requests_total")
    # No subject, serial or address in any label.
    assert "metrics-device" not in text and "metrics-wrong" not in text
    assert "127.0.0.1" not in text
    assert not any(serial in text for serial in serials)


def test_exposition_passes_promtool(mserver: Server) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    text = scrape(mserver.url)
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_sighup_neither_loses_nor_doubles_counters(mca: DevCa, mserver: Server) -> None:
    time.sleep(1.5)  # every count of the requests so far is in the shared files
    before = parse(scrape(mserver.url))
    old = set(worker_pids(mserver.process.pid))
    mserver.process.send_signal(signal.SIGHUP)

    def replaced() -> bool:
        now = set(worker_pids(mserver.process.pid))
        return len(now) == 2 and not now & old

    wait_for(replaced, "new workers")
    wait_for(lambda: _sampling(mca, worker_pids(mserver.process.pid)), "the new workers ready")
    after = parse(scrape(mserver.url))
    for name in ("hsmscep_requests_total", "hsmscep_enrollments_total"):
        # The scrapes themselves are no SCEP requests: nothing moved.
        assert total(after, name) == total(before, name) > 0, name
    # The old workers' live gauges left with them: still one token, up.
    assert total(after, "hsmscep_hsm_token_up") == 1
    # The CRL the first workers signed at start, as the new ones read it from the store.
    crl: list[Samples] = []
    wait_for(
        lambda: (
            crl.append(parse(scrape(mserver.url)))
            or total(crl[-1], "hsmscep_crl_number", ca="default") >= 1
        ),
        "the CRL's gauges",
        seconds=20,
    )
    this_update = total(crl[-1], "hsmscep_crl_this_update_timestamp_seconds", ca="default")
    next_update = total(crl[-1], "hsmscep_crl_next_update_timestamp_seconds", ca="default")
    assert 0 < this_update <= time.time() < next_update
    signed = total(crl[-1], "hsmscep_hsm_operation_seconds_count", operation="sign_crl")
    assert signed >= 1  # timed apart from the certificates the CA key signs
    ca_certs = fetch_ca_certs(mserver.url)
    request = new_request(ca_certs, mca.challenge, cn="metrics-after-hup")
    issued_cert(post_pki(mserver.url, request.der), request, ca_certs)
    issued = {"outcome": "issued"}
    expected = total(before, "hsmscep_enrollments_total", **issued) + 1

    def counted() -> bool:
        final = parse(scrape(mserver.url))
        return total(final, "hsmscep_enrollments_total", **issued) == expected

    wait_for(counted, "the new enrollment counted once", seconds=15)
    time.sleep(1.5)  # and not again at the next flush
    assert total(parse(scrape(mserver.url)), "hsmscep_enrollments_total", **issued) == expected


def test_separate_listener_with_the_admin_token(mca: DevCa, tmp_path: Path) -> None:
    port = free_port()
    env = {
        "HSMSCEP_METRICS_LISTEN": f"127.0.0.1:{port}",
        "HSMSCEP_METRICS_REQUIRE_ADMIN_TOKEN": "true",
        "HSMSCEP_METRICS_DIRECTORY": str(tmp_path / "own-dir"),
    }
    server = start_server(mca, env)
    try:
        listener = f"http://127.0.0.1:{port}"
        # Not on the SCEP port; on its own port only at its path, and only with the token.
        assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 404
        assert httpx.get(f"{listener}/metrics", timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token-0123456789"}
        assert httpx.get(f"{listener}/metrics", headers=wrong, timeout=10).status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{listener}/other", headers=good, timeout=10).status_code == 404
        response = httpx.get(f"{listener}/metrics", headers=good, timeout=10)
        assert response.status_code == 200
        assert total(parse(response.text), "hsmscep_build_info") == 1
    finally:
        code = server.stop()
    assert code == 0, server.output()


# ---- in process: one process, the default registry -----------------------------------------


def test_in_process_metrics_and_the_admin_token(tmp_path: Path) -> None:
    (tmp_path / "admin-token").write_text(TOKEN + "\n")
    extra = '\n[admin]\ntoken_file = "admin-token"\n\n[metrics]\nrequire_admin_token = true\n'
    with serve(soft_ca(tmp_path, "metrics-inproc", extra_config=extra)) as http:
        assert http.get("/scep", params={"operation": "GetCACaps"}).status_code == 200
        assert http.get("/metrics").status_code == 401
        bad = http.get("/metrics", headers={"Authorization": "Bearer x" * 3})
        assert bad.status_code == 401
        good = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 200
        caps = {"message_type": "GetCACaps", "outcome": "success", "status": "200"}
        assert total(parse(good.text), "hsmscep_requests_total", **caps) >= 1


def test_metrics_can_be_disabled(tmp_path: Path) -> None:
    extra = "\n[metrics]\nenabled = false\n"
    with serve(soft_ca(tmp_path, "metrics-off", extra_config=extra)) as http:
        assert http.get("/metrics").status_code == 404
        assert http.get("/scep", params={"operation": "GetCACaps"}).status_code == 200


# ---- pure helpers -------------------------------------------------------------------------


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9102") == ("127.0.0.1", 9102)
    assert parse_listen("[::1]:9102") == ("::1", 9102)
    for wrong in ("9102", "127.0.0.1", "host:0", "host:70000", ":9102", "host:x"):
        with pytest.raises(ConfigError):
            parse_listen(wrong)


def test_error_statuses_match_the_error_map() -> None:
    assert status_of(MessageError("x")) == 400
    assert status_of(PayloadTooLarge("x")) == 413
    assert status_of(HsmBusy("x")) == 503
    assert status_of(StoreError("x")) == 503
    assert status_of(RuntimeError("x")) == 500


def test_bearer_check() -> None:
    assert authorized(f"Bearer {TOKEN}", TOKEN)
    assert authorized(f"bearer  {TOKEN} ", TOKEN)
    assert not authorized(f"Basic {TOKEN}", TOKEN)
    assert not authorized("Bearer", TOKEN)


def test_supervisor_wsgi_app_refuses_other_paths_and_methods() -> None:
    app = wsgi_app("/metrics", TOKEN)
    statuses: list[str] = []

    def start(status: str, headers: list[tuple[str, str]]) -> None:
        statuses.append(status)

    app({"PATH_INFO": "/metrics", "REQUEST_METHOD": "POST"}, start)
    app({"PATH_INFO": "/metrics", "REQUEST_METHOD": "GET"}, start)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {TOKEN}"}
    body = app({"PATH_INFO": "/metrics", "REQUEST_METHOD": "GET", **auth}, start)
    assert statuses == ["404 Not Found", "401 Unauthorized", "200 OK"]
    assert b"# HELP" in b"".join(body)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("require_admin_token = true", "needs an admin token"),
        ('path = "/scep"', "metrics.path"),
        ('path = "metrics"', "metrics.path"),
        ('listen = "9102"', "metrics.listen"),
    ],
)
def test_metrics_settings_are_checked(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        soft_ca(tmp_path, "metrics-config", extra_config=f"\n[metrics]\n{extra}\n")


def test_one_time_challenge_events(tmp_path: Path) -> None:
    events: list[str] = []

    async def scenario(store: CertStore) -> None:
        for secret, expires in (("otp-live", T0 + timedelta(hours=1)), ("otp-old", T0)):
            digest = hashlib.sha256(secret.encode()).hexdigest()
            await store.add_challenge(
                StoredChallenge(hash=digest, created_at=T0, expires_at=expires, profile="otp")
            )
        policy = OneTimeChallenge(store, lambda: T0, event=events.append)
        first = candidate(ONE_TIME, "otp-live")
        assert await policy.authorize(first) is ALLOW
        assert await policy.authorize(first) is ALLOW  # a retry: consumed, not twice used
        await policy.authorize(candidate(ONE_TIME, "otp-live"))  # another request: used
        await policy.authorize(candidate(ONE_TIME, "otp-old"))
        await policy.authorize(candidate(ONE_TIME, "never-issued"))
        await policy.authorize(candidate(ONE_TIME, None))

    with_store(tmp_path, scenario)
    assert events == ["consumed", "consumed", "refused", "expired", "refused", "refused"]


def test_tallies_flush_exactly_what_was_recorded() -> None:
    registry = CollectorRegistry()
    counter = Counter("t_requests", "t", ["x"], registry=registry)
    histogram = Histogram("t_seconds", "t", buckets=(0.1, 1.0), registry=registry)
    tally, spread = Tally(counter.labels("a")), Spread(histogram)
    for value in (0.05, 0.1, 0.5, 5.0):
        tally.inc()
        spread.observe(value)
    spread.flush()
    tally.flush()
    tally.flush()  # nothing new: nothing added
    spread.observe(0.2)
    spread.flush()
    got = {(s.name, s.labels.get("le")): s.value for m in registry.collect() for s in m.samples}
    assert got[("t_requests_total", None)] == 4
    assert got[("t_seconds_bucket", "0.1")] == 2  # le is inclusive
    assert got[("t_seconds_bucket", "1.0")] == 4
    assert got[("t_seconds_bucket", "+Inf")] == 5
    assert got[("t_seconds_count", None)] == 5
    assert got[("t_seconds_sum", None)] == pytest.approx(5.85)


def test_process_directory_is_made_emptied_and_removed(tmp_path: Path) -> None:
    with process_directory(MetricsSettings()) as made:
        assert made is not None and os.environ[DIR_ENV] == made and Path(made).is_dir()
    assert DIR_ENV not in os.environ and not Path(made).exists()  # ours: removed
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "counter_1.db").write_bytes(b"old")
    (kept / "notes.txt").write_text("not ours")
    with process_directory(MetricsSettings(directory=kept)) as given:
        assert given == str(kept) and not (kept / "counter_1.db").exists()
    assert (kept / "notes.txt").exists() and DIR_ENV not in os.environ  # configured: kept
    with process_directory(MetricsSettings(enabled=False)) as none:
        assert none is None and DIR_ENV not in os.environ


def test_supervisor_listener_serves_and_refuses_a_taken_address() -> None:
    port = free_port()
    with supervisor_listener(MetricsSettings(listen=("127.0.0.1", port)), None):
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert response.status_code == 200 and "# HELP hsmscep_requests_total" in response.text
        with (
            pytest.raises(ConfigError, match="metrics.listen"),
            supervisor_listener(MetricsSettings(listen=("127.0.0.1", port)), None),
        ):
            pass


@pytest.mark.anyio
async def test_pool_reports_queue_waits_rejections_and_depth() -> None:
    waits: list[float] = []
    rejected: list[int] = []
    observers: list[int] = []

    def wait_observer() -> Callable[[float], None]:
        observers.append(threading.get_ident())  # once per worker thread
        return waits.append

    pool: SigningPool[object] = SigningPool(
        object,
        size=1,
        max_pending=2,
        wait_observer=wait_observer,
        on_reject=lambda: rejected.append(1),
    )
    await pool.start()
    gate = threading.Event()
    try:
        first = asyncio.ensure_future(pool.run(lambda _: gate.wait(10)))
        second = asyncio.ensure_future(pool.run(lambda _: "second"))
        await asyncio.sleep(0.05)
        assert (pool.pending, pool.queued()) == (2, 1)  # one running, one waiting
        with pytest.raises(HsmBusy):
            await pool.run(lambda _: "refused")
        gate.set()
        assert await first is True and await second == "second"
    finally:
        await pool.aclose()
    assert rejected == [1] and len(observers) == 1
    assert len(waits) == 2 and waits[1] >= 0.05  # the second waited behind the first


def test_sampled_gauges_sum_pools_and_take_any_ready_member() -> None:
    def service(pending: int, queued: int) -> Any:
        pool = SimpleNamespace(pending=pending, queued=lambda: queued, size=4)
        return SimpleNamespace(pool=pool)

    rows = [
        {"token": "token-a", "ready": False},
        {"token": "token-a", "ready": True},  # the same token in another CA's keyring
        {"token": "token-b", "ready": False},
    ]
    gauges.sample_pools({"x": service(3, 1), "y": service(2, 0)}, lambda: rows)
    assert REGISTRY.get_sample_value("hsmscep_pool_in_flight") == 5
    assert REGISTRY.get_sample_value("hsmscep_pool_queue_depth") == 1
    assert REGISTRY.get_sample_value("hsmscep_pool_threads") == 8
    assert REGISTRY.get_sample_value("hsmscep_hsm_token_up", {"token": "token-a"}) == 1
    assert REGISTRY.get_sample_value("hsmscep_hsm_token_up", {"token": "token-b"}) == 0


def test_sampled_store_gauges_and_store_errors() -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    latest = CrlInfo(7, 3, now, now + timedelta(hours=24))

    def held(status: str) -> Any:
        return SimpleNamespace(status=status)

    async def crl_status() -> CrlStatus:
        return CrlStatus(3, latest)

    async def pending_requests() -> list[Any]:
        return [held("pending"), held("approved"), held("pending")]

    async def failing() -> list[Any]:
        raise StoreError("database is locked")

    store = SimpleNamespace(crl_status=crl_status, pending_requests=pending_requests)
    asyncio.run(gauges.sample_store("sampled", cast(Any, SimpleNamespace(store=store))))
    ca = {"ca": "sampled"}
    assert REGISTRY.get_sample_value("hsmscep_crl_number", ca) == 7
    this_update = REGISTRY.get_sample_value("hsmscep_crl_this_update_timestamp_seconds", ca)
    assert this_update == now.timestamp()
    next_update = REGISTRY.get_sample_value("hsmscep_crl_next_update_timestamp_seconds", ca)
    assert next_update == now.timestamp() + 86400
    assert REGISTRY.get_sample_value("hsmscep_pending_requests", ca) == 2
    errors = {"operation": "pending"}
    before = REGISTRY.get_sample_value("hsmscep_store_errors_total", errors) or 0
    store.pending_requests = failing
    asyncio.run(gauges.sample_store("sampled", cast(Any, SimpleNamespace(store=store))))
    assert REGISTRY.get_sample_value("hsmscep_store_errors_total", errors) == before + 1
    assert REGISTRY.get_sample_value("hsmscep_pending_requests", ca) == 2  # the last known


def test_an_unusable_metrics_directory_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    with (
        pytest.raises(ConfigError, match="metrics.directory"),
        process_directory(MetricsSettings(directory=blocker / "sub")),
    ):
        pass
    assert DIR_ENV not in os.environ
