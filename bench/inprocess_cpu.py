"""Server CPU per enrollment in one process: the real app over ASGI on a SoftHSM2 dev token.

No socket and no load generator in the way: `concurrency` tasks replay pre-built PKCSReqs
straight into the ASGI app (Starlette routing, the service, the signing pool, the SQLite
group commit) on a uvloop loop. The process's CPU time over the timed requests is split into
the private-key calls (thread CPU time around every C_Sign/C_Decrypt, taken in the keyring's
guard on the signing thread) and the rest: the server's own work per enrollment, less
uvicorn/httptools (~20-30 us a request) and plus the small cost of this driver.

  python -m bench.inprocess_cpu --requests 3000 --concurrency 32
  python -m bench.inprocess_cpu --profile /tmp/enroll.prof   # cProfile of every thread
  python -m bench.inprocess_cpu --pin 1   # one CPU, as each server process of the driver runs

Numbers are CPU time, so they hold on a loaded box better than throughput does; with
--profile they include cProfile's own overhead (use them for shares, not for totals); the
profile's times are each thread's CPU time, so waiting (queues, locks, the selector) is not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import resource
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from bench import prefill
from hsmscep.cli.bootstrap import InitOptions, init
from hsmscep.cli.dev import dev_config
from hsmscep.config.settings import load_settings
from hsmscep.hsm import devtoken, keyring
from hsmscep.store import groupcommit
from hsmscep.testing.requests import build_pkcs_req
from hsmscep.web.app import create_app

CLIENT_KEYS = 8
MAX_SECONDS = 600.0  # a hard bound on the timed part, whatever --requests says

# Rows per store commit: [commits, rows], counted on the committer thread.
_commits = [0, 0]


def _counted_commit(commit: Callable[..., Any]) -> Callable[..., Any]:
    def counted(self: Any, items: list[Any]) -> Any:
        _commits[0] += 1
        _commits[1] += len(items)
        return commit(self, items)

    return counted


# Thread CPU seconds spent inside private-key calls, per thread (each thread writes its own).
_hsm_cpu: dict[int, float] = {}
_hsm_calls: dict[int, int] = {}


def _timed_guard(make: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap keyring._guard so each HSM call's thread CPU time is counted."""

    def make_guard(*args: Any) -> Any:
        guard = make(*args)

        def timed(call: Callable[[], bytes]) -> bytes:
            ident = threading.get_ident()
            start = time.thread_time()
            try:
                return guard(call)  # type: ignore[no-any-return]
            finally:
                _hsm_cpu[ident] = _hsm_cpu.get(ident, 0.0) + time.thread_time() - start
                _hsm_calls[ident] = _hsm_calls.get(ident, 0) + 1

        return timed

    return make_guard


def _build_requests(directory: Path, challenge: str, count: int) -> list[bytes]:
    ca_certs = [
        x509.load_pem_x509_certificate((directory / name).read_bytes())
        for name in ("ca.pem", "ra.pem")
    ]
    keys = [rsa.generate_private_key(65537, 2048) for _ in range(CLIENT_KEYS)]
    out = []
    for i in range(count):
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsmscep-bench"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"cpu-{secrets.token_hex(4)}-{i}"),
            ]
        )
        req = build_pkcs_req(
            key=keys[i % CLIENT_KEYS], ca_certs=ca_certs, challenge=challenge, subject=subject
        )
        out.append(req.der)
    return out


async def _post(app: Any, state: dict[str, Any], body: bytes) -> int:
    """One POST PKIOperation through the ASGI app, as uvicorn would call it; the status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/scep",
        "raw_path": b"/scep",
        "root_path": "",
        "query_string": b"operation=PKIOperation",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/x-pki-message"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "state": dict(state),
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # no disconnect while the request runs
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def _drive(app: Any, requests: list[bytes], warmup: int, concurrency: int) -> dict[str, Any]:
    async with app.router.lifespan_context(app) as state:
        state = dict(state or {})
        for der in requests[:warmup]:  # one at a time: connections, caches, the store warm
            assert await _post(app, state, der) == 200
        timed = requests[warmup:]
        statuses: list[int] = []
        queue = iter(timed)
        deadline = time.monotonic() + MAX_SECONDS

        async def client() -> None:
            for der in queue:
                statuses.append(await _post(app, state, der))
                if time.monotonic() > deadline:
                    return

        _hsm_cpu.clear()
        _hsm_calls.clear()
        _commits[:] = [0, 0]
        threads0 = _thread_cpu()
        rusage0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        threads = _thread_cpu()
        rusage = resource.getrusage(resource.RUSAGE_SELF)
        switches = rusage.ru_nvcsw + rusage.ru_nivcsw - rusage0.ru_nvcsw - rusage0.ru_nivcsw
        hsm_cpu, hsm_calls = sum(_hsm_cpu.values()), sum(_hsm_calls.values())
    ok = statuses.count(200)
    return {
        "enrollments": ok,
        "errors": len(statuses) - ok,
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "enrollments_per_s": round(ok / wall, 1) if wall else None,
        "hsm_calls_per_enrollment": round(hsm_calls / ok, 3) if ok else None,
        "cpu_us_per_enrollment": round(1e6 * cpu / ok, 1) if ok else None,
        "hsm_cpu_us_per_enrollment": round(1e6 * hsm_cpu / ok, 1) if ok else None,
        "cpu_us_outside_hsm_per_enrollment": round(1e6 * (cpu - hsm_cpu) / ok, 1) if ok else None,
        # Per thread (event loop = MainThread, signing workers, the store's threads), from
        # /proc in clock ticks: coarse, but it shows where the part outside the HSM runs.
        "thread_cpu_us_per_enrollment": {
            name: round(1e6 * (used - threads0.get(name, 0.0)) / ok)
            for name, used in sorted(threads.items())
            if ok and used > threads0.get(name, 0.0)
        },
        # Kernel time: GIL and queue hand-offs (futex), wake-ups, the store's writes and fsync.
        "rows_per_commit": round(_commits[1] / _commits[0], 2) if _commits[0] else None,
        "system_cpu_us_per_enrollment": (
            round(1e6 * (rusage.ru_stime - rusage0.ru_stime) / ok) if ok else None
        ),
        "context_switches_per_enrollment": round(switches / ok, 1) if ok else None,
    }


def _thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system, from /proc) of each live thread, by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended meanwhile
            continue
        name = names.get(int(task.name), "other")
        name = name.rstrip("0123456789").rstrip("-_ ") or name  # hsm-worker-0 -> hsm-worker
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _profile_threads(profiles: list[cProfile.Profile]) -> None:
    """Give every thread started from now on a cProfile of its own."""

    def start(frame: Any, event: str, arg: Any) -> None:
        profile = cProfile.Profile(time.thread_time)  # CPU, not the time a thread waits
        profiles.append(profile)
        profile.enable()  # replaces this hook for the rest of the thread's life

    threading.setprofile(start)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Set up a dev CA in a temp dir, replay the requests, return the figures."""
    keyring._guard = _timed_guard(keyring._guard)
    groupcommit.GroupCommitter._commit = _counted_commit(groupcommit.GroupCommitter._commit)  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="hsmscep-cpu-") as tmp:
        directory = Path(tmp)
        token = devtoken.ensure_token(directory / "softhsm", label="hsmscep-cpu")
        (directory / "pin").write_text(token.pin_file.read_text())
        (directory / "challenge").write_text("bench-challenge\n")
        config = directory / "hsmscep.toml"
        config.write_text(dev_config(token.module, token.label, "pin", "challenge"))
        settings = load_settings(config)
        init(settings, InitOptions(ca_key=args.ca_key, subject="CN=hsmscep cpu bench CA"))
        if args.prefill:
            asyncio.run(prefill.prefill_sqlite(Path(settings.store.path), args.prefill))
        settings = replace(settings, server=replace(settings.server, pool_size=args.pool_size))
        requests = _build_requests(directory, "bench-challenge", args.warmup + args.requests)
        profiles: list[cProfile.Profile] = []
        if args.profile:
            _profile_threads(profiles)
            main = cProfile.Profile(time.thread_time)
            profiles.append(main)
            main.enable()
        app = create_app(settings)
        try:
            import uvloop

            result = uvloop.run(_drive(app, requests, args.warmup, args.concurrency))
        finally:
            if args.profile:
                main.disable()
                threading.setprofile(None)
        if args.profile:
            stats = pstats.Stats(profiles[0])
            for p in profiles[1:]:
                stats.add(p)
            stats.dump_stats(args.profile)
            stats.sort_stats("tottime").print_stats(args.top)
    result.update(
        ca_key=args.ca_key,
        pool_size=args.pool_size,
        prefill=args.prefill,
        profiled=bool(args.profile),
        pinned_cpu=args.pin,
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="timed requests")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pool-size", type=int, default=1, help="signing threads (default 1)")
    parser.add_argument("--ca-key", choices=["rsa2048", "p256"], default="rsa2048")
    parser.add_argument("--prefill", type=int, default=0, help="certificates stored beforehand")
    parser.add_argument("--profile", default=None, help="write a cProfile of all threads here")
    parser.add_argument("--top", type=int, default=40, help="functions printed with --profile")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument(
        "--pin",
        type=int,
        default=None,
        metavar="CPU",
        help="run on this CPU only, as each `--workers auto` server process is (web/affinity.py)",
    )
    args = parser.parse_args(argv)
    if args.pin is not None:
        # Set before any thread starts: threads inherit the mask.
        os.sched_setaffinity(0, {args.pin})
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    sys.exit(1 if result["errors"] or not result["enrollments"] else 0)


if __name__ == "__main__":
    main()
