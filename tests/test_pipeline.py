"""The signing pipeline under pressure: admission control, graceful shutdown, connections spread
over worker processes; live server."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import struct
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmscep.store.records import IssuedCert
from hsmscep.store.sqlite import CertStore
from hsmscep.testing import client
from hsmscep.web.balance import TABLE_ENV, ConnectionTable
from tests.conftest import DevCa, Server, start_server

pytestmark = pytest.mark.hsm


def build_requests(
    url: str, ca: DevCa, count: int
) -> tuple[list[client.ClientRequest], list[x509.Certificate]]:
    with urllib.request.urlopen(f"{url}/scep?operation=GetCACert") as r:
        ca_certs = client.parse_ca_certs(r.read())
    keys = [rsa.generate_private_key(65537, 2048) for _ in range(4)]
    requests = [
        client.build_pkcs_req(
            key=keys[i % len(keys)],
            ca_certs=ca_certs,
            challenge=ca.challenge,
            subject=x509.Name.from_rfc4514_string(f"CN=pipeline-{i}"),
        )
        for i in range(count)
    ]
    return requests, ca_certs


def raw_post(port: int, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """One POST on its own connection; (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


def rows(ca: DevCa) -> int:
    with sqlite3.connect(ca.settings.store.path) as db:
        return int(db.execute("SELECT count(*) FROM certificates").fetchone()[0])


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def test_overload_answers_503_with_retry_after_and_nothing_else(dev_ca: DevCa) -> None:
    srv = start_server(dev_ca, {"HSMSCEP_SERVER_POOL_SIZE": "1", "HSMSCEP_SERVER_MAX_PENDING": "2"})
    try:
        requests, ca_certs = build_requests(srv.url, dev_ca, 80)
        before = rows(dev_ca)
        with ThreadPoolExecutor(max_workers=80) as pool:
            answers = list(pool.map(lambda r: raw_post(port_of(srv), r.der), requests))
        after = rows(dev_ca)
    finally:
        srv.stop()
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    for (status, headers, body), request in zip(answers, requests, strict=True):
        if status == 503:
            assert headers.get("retry-after") == "1"
        else:
            result = client.open_cert_rep(body, request, ca_certs)
            assert result.pki_status == "0"
    assert after - before == statuses.count(200)


def test_graceful_shutdown_drains_in_flight_requests(dev_ca: DevCa) -> None:
    srv = start_server(dev_ca, {"HSMSCEP_SERVER_POOL_SIZE": "1"})
    requests, ca_certs = build_requests(srv.url, dev_ca, 40)
    before = rows(dev_ca)
    port = port_of(srv)

    def send(request: client.ClientRequest) -> tuple[int, bytes] | None:
        try:
            status, _, body = raw_post(port, request.der)
        except OSError:
            return None  # arrived after the listener closed
        return status, body

    with ThreadPoolExecutor(max_workers=40) as pool:
        futures = [pool.submit(send, r) for r in requests]
        futures[0].result()  # the server is busy with the rest now
        srv.process.send_signal(signal.SIGTERM)
        answers = [f.result() for f in futures]
    # uvicorn re-raises the signal once it has shut down cleanly
    assert srv.process.wait(timeout=60) in (0, -signal.SIGTERM)
    issued = 0
    for answer, request in zip(answers, requests, strict=True):
        if answer is None:
            continue
        status, body = answer
        assert status in (200, 503), status
        if status == 200:
            assert client.open_cert_rep(body, request, ca_certs).pki_status == "0"
            issued += 1
    assert issued >= 1
    assert rows(dev_ca) - before == issued  # nothing stored that was not delivered, and back
    assert "Application shutdown complete" in srv.output()


def worker_pids(parent: int) -> list[int]:
    """uvicorn's worker processes under `parent`, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            # multiprocessing's resource tracker is a child too; workers run spawn_main.
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
                children.append(int(entry.name))
    return children


def holder_of(client_port: int, server_port: int, pids: list[int]) -> int:
    """Which of `pids` holds the server side of the loopback connection from client_port."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and (
            int(remote.split(":")[1], 16) == client_port
        ):
            inode = fields[9]
    assert inode is not None, "no server-side socket for the connection"
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker holds socket {inode}")


def published_counts(worker: int) -> list[int]:
    """The connection counts in the workers' shared table (negative: no worker)."""
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    prefix = TABLE_ENV.encode() + b"="
    [path] = [entry[len(prefix) :] for entry in environ if entry.startswith(prefix)]
    data = Path(path.decode()).read_bytes()
    counts = [value for (value,) in struct.iter_unpack("=q", data)]
    return [count for count in counts if count >= 0]


def keep_alive_get(sock: socket.socket, path: str) -> bytes:
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


def test_keep_alive_connections_are_spread_evenly_over_worker_processes(dev_ca: DevCa) -> None:
    srv = start_server(dev_ca, {"HSMSCEP_SERVER_WORKERS": "2"})
    connections: list[socket.socket] = []
    try:
        port = port_of(srv)
        pids = worker_pids(srv.process.pid)
        assert len(pids) == 2
        # /healthz answers as soon as one worker is up; the other joins when its lifespan is done.
        for _ in range(300):
            if srv.output().count("Application startup complete") == 2:
                break
            time.sleep(0.1)
        # One at a time, like clients arriving: uvicorn's shared accept alone lets whichever
        # process wakes first take each of them (21 of 32 in bench/PROFILE.md).
        for _ in range(24):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            except OSError as exc:
                pytest.fail(f"connect failed ({exc}); server output:\n{srv.output()}")
            connections.append(sock)
            keep_alive_get(sock, "/healthz")
        holders = Counter(holder_of(sock.getsockname()[1], port, pids) for sock in connections)
        # Each connection served a request, so each was accepted and counted.
        assert sorted(holders) == sorted(pids)
        assert max(holders.values()) - min(holders.values()) <= 2, holders
        # What each worker tells the other: its own count, exactly.
        assert sorted(published_counts(pids[0])) == sorted(holders.values())
        # The connections work after the hand-over: each answers on its own process.
        for sock in connections:
            assert b"POSTPKIOperation" in keep_alive_get(sock, "/scep?operation=GetCACaps")
    finally:
        for sock in connections:
            sock.close()
        code = srv.stop()
    assert code in (0, -signal.SIGTERM)
    assert srv.output().count("Application shutdown complete") == 2


def thread_cpus(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets the threads of process `pid` may run on."""
    return {
        frozenset(os.sched_getaffinity(int(task.name)))
        for task in Path(f"/proc/{pid}/task").iterdir()
    }


def audit_lines(output: str) -> list[dict[str, str]]:
    return [
        json.loads(line.split(" hsmscep.audit ", 1)[1])
        for line in output.splitlines()
        if " hsmscep.audit " in line
    ]


@pytest.mark.parametrize("pin", [True, False], ids=["pinned", "unpinned"])
def test_one_worker_per_cpu_pins_each_and_every_worker_writes_audit_lines(
    dev_ca: DevCa, pin: bool
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs at least 2 CPUs")
    env = {"HSMSCEP_SERVER_WORKERS": str(len(cpus)), "HSMSCEP_SERVER_PIN_CPUS": str(pin).lower()}
    srv = start_server(dev_ca, env)
    try:
        for _ in range(300):
            if srv.output().count("Application startup complete") == len(cpus):
                break
            time.sleep(0.1)
        pids = worker_pids(srv.process.pid)
        assert len(pids) == len(cpus)
        placement = [thread_cpus(pid) for pid in pids]
        requests, ca_certs = build_requests(srv.url, dev_ca, 12)
        # Each on its own connection, a few at a time: the balancer spreads them over workers.
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda r: raw_post(port_of(srv), r.der), requests))
        output = srv.output()
    finally:
        srv.stop()
    if pin:
        # Every thread of a worker (loop, signing worker, store) on one CPU; one worker per CPU.
        assert all(len(threads) == 1 for threads in placement), placement
        assert sorted(next(iter(next(iter(t)))) for t in placement) == cpus
        assert output.count("pinned to CPU") == len(cpus)
    else:
        assert all(threads == {frozenset(cpus)} for threads in placement), placement
        assert "pinned to CPU" not in output
    assert [status for status, _, _ in answers] == [200] * len(requests)
    for (_, _, body), request in zip(answers, requests, strict=True):
        assert client.open_cert_rep(body, request, ca_certs).pki_status == "0"
    # Worker processes are spawned and run none of the CLI's logging set-up: every issued
    # certificate must still have its audit line.
    issued = [line for line in audit_lines(output) if line["decision"] == "issued"]
    assert sorted(line["transaction_id"] for line in issued) == sorted(
        r.transaction_id for r in requests
    )


def _hold_slot(path: str, count: int, pipe: Connection) -> None:
    table = ConnectionTable(path)
    table.publish(count)
    pipe.send(table.slot)
    pipe.recv()  # until the parent is done looking


def test_connection_table_counts_only_live_peers() -> None:
    ctx = multiprocessing.get_context("spawn")
    peers: list[tuple[multiprocessing.process.BaseProcess, Connection, int]] = []

    def start_peer(path: str, count: int) -> int:
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_hold_slot, args=(path, count, child_end))
        proc.start()
        assert parent_end.poll(30), "peer did not start"
        slot = int(parent_end.recv())
        peers.append((proc, parent_end, slot))
        return slot

    with ConnectionTable.created(4) as path:
        mine = ConnectionTable(path)
        try:
            assert mine.least_loaded_peer() is None
            busy = start_peer(path, 7)
            idle = start_peer(path, 3)
            assert len({mine.slot, busy, idle}) == 3
            assert mine.least_loaded_peer() == 3
            # A peer that exits leaves its count behind, but its lock goes with it.
            proc, pipe, _ = peers[1]
            pipe.send(None)
            proc.join(30)
            assert mine.least_loaded_peer() == 7
            # Its slot is free again for a replacement worker.
            assert start_peer(path, 1) == idle
            assert mine.least_loaded_peer() == 1
        finally:
            for proc, pipe, _ in peers:
                if proc.is_alive():
                    pipe.send(None)
                    proc.join(30)
            mine.close()


def _stored_cert(serial: int) -> IssuedCert:
    now = datetime.now(UTC)
    return IssuedCert(
        serial=serial,
        subject=f"CN=lock-{serial}",
        sans=(),
        not_before=now,
        not_after=now + timedelta(days=1),
        transaction_id=f"lock-{serial}",
        requester_fingerprint="aa" * 32,
        public_key_sha256=f"{serial:064x}",
        der=b"\x30\x03\x02\x01\x00",
    )


def test_group_commits_of_two_processes_wait_for_each_others_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"

    async def scenario() -> int:
        first = await CertStore.open(path)
        second = await CertStore.open(path)
        try:
            # Another writer (a peer process, the CLI) holds the lock: commits wait, not fail.
            with sqlite3.connect(path, isolation_level=None) as other:
                other.execute("BEGIN IMMEDIATE")
                waiting = asyncio.ensure_future(first.put(_stored_cert(1)))
                await asyncio.sleep(0.2)
                assert not waiting.done()
                other.execute("COMMIT")
            await waiting
            # Two writers at full speed on one file, as the worker processes run.
            await asyncio.gather(
                *(first.put(_stored_cert(serial)) for serial in range(2, 202)),
                *(second.put(_stored_cert(serial)) for serial in range(202, 402)),
            )
        finally:
            await first.close()
            await second.close()
        with sqlite3.connect(path) as db:
            return int(db.execute("SELECT count(*) FROM certificates").fetchone()[0])

    assert asyncio.run(scenario()) == 401
