"""Benchmark driver: hsmscep against micromdm scepserver and against the raw HSM, on 127.0.0.1.

  python -m bench.driver              compare: both CA keys, concurrency 1..256 (~6 min, 2 cores)
  python -m bench.driver --quick      short smoke run of the same
  python -m bench.driver --soak       10 min of hsmscep at 70 % of its peak
  python -m bench.driver --overload   hsmscep offered 4x its peak

Per load phase: pre-build the PKCSReqs (outside the timed phase), run locust headless with
bench/locustfile.py, then verify every response (bench/workload.py) and count only verified
enrollments with a serial number not seen before. See bench/README.md for what each number
means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

if not __package__:  # `python bench/driver.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ceiling, cpusplit, pgstore, report, variant_report, variants  # noqa: E402
from bench.scraper import Scraper  # noqa: E402
from bench.servers import (  # noqa: E402
    RssSampler,
    ServerHandle,
    cert_ders,
    cpu_seconds,
    exit_on_sigterm,
    free_port,
    host_cpu_seconds,
    peak_rss_hwm,
    reset_scepserver,
    start_hsmscep,
    start_scepserver,
)
from bench.workload import (  # noqa: E402
    BENCH_DIR,
    KEY_DIR,
    RSA_BITS,
    BuiltRequest,
    Outcome,
    build_batch,
    generate_key,
    init_worker,
    missing_keys,
    read_stream,
    verify_batch,
    write_requests,
)

LOCUSTFILE = BENCH_DIR / "locustfile.py"
RESULTS_DIR = BENCH_DIR / "results"
CHALLENGE = "bench-challenge-0123456789"
BUILD_CHUNK = 200
VERIFY_CHUNK = 200
LOCUST_GRACE = 120.0  # seconds a locust run may overrun --run-time before we kill it
FIRST_RATE_GUESS = 300.0  # enrollments/s assumed before anything was measured


@dataclass(slots=True)
class Series:
    """One server instance under load, and the requests built for it."""

    handle: ServerHandle
    run_tag: str
    est_rate: float = FIRST_RATE_GUESS
    built: int = 0
    unsent: deque[BuiltRequest] = field(default_factory=deque)
    meta: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # txid -> nonce, key
    serials: set[int] = field(default_factory=set)  # every serial this server issued to us
    # scepserver: a clean depot (same CA) per phase, duplicate serials counted per phase.
    reset_per_phase: bool = False
    phases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.handle.label


class Bench:
    """Holds the process pool for building and verifying, and runs load phases."""

    def __init__(self, workdir: Path, key_count: int) -> None:
        self.workdir = workdir
        self.key_count = key_count
        self.scrape_every = 0.0  # --scrape: GET /metrics from hsmscep during each phase
        self.cpus = os.cpu_count() or 1
        ctx = get_context("spawn")  # no fork: the driver runs threads and owns servers
        todo = missing_keys(key_count)
        if todo:
            print(f"generating {len(todo)} RSA-{RSA_BITS} client keys into {KEY_DIR}")
            with ProcessPoolExecutor(self.cpus, mp_context=ctx) as pool:
                list(pool.map(generate_key, todo, chunksize=8))
        self.pool = ProcessPoolExecutor(
            self.cpus, mp_context=ctx, initializer=init_worker, initargs=(key_count,)
        )

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)

    # ------------------------------------------------------------------ requests

    def build(self, series: Series, count: int) -> None:
        """Append `count` fresh requests for the series' server (outside any timed phase)."""
        if count <= 0:
            return
        ca = cert_ders(series.handle.ca_certs)
        futures = []
        for first in range(series.built, series.built + count, BUILD_CHUNK):
            n = min(BUILD_CHUNK, series.built + count - first)
            futures.append(self.pool.submit(build_batch, ca, CHALLENGE, series.run_tag, first, n))
        for fut in futures:
            for txid, der, nonce, index in fut.result():
                series.unsent.append((txid, der, nonce, index))
                series.meta[txid] = (nonce, index)
        series.built += count

    def verify(self, series: Series, bodies: Iterable[tuple[str, bytes]]) -> Iterator[Outcome]:
        """Verify (txid, body) pairs in the pool, keeping a bounded number of chunks in flight."""
        ca = cert_ders(series.handle.ca_certs)
        anchors = cert_ders(series.handle.anchors)
        pending: deque[Future[list[Outcome]]] = deque()
        chunk: list[tuple[str, bytes, int, bytes]] = []
        for txid, body in bodies:
            nonce, index = series.meta[txid]
            chunk.append((txid, nonce, index, body))
            if len(chunk) >= VERIFY_CHUNK:
                pending.append(self.pool.submit(verify_batch, ca, anchors, chunk))
                chunk = []
                while len(pending) > 4 * self.cpus:
                    yield from pending.popleft().result()
        if chunk:
            pending.append(self.pool.submit(verify_batch, ca, anchors, chunk))
        while pending:
            yield from pending.popleft().result()

    # ------------------------------------------------------------------ one load phase

    def run_phase(
        self,
        series: Series,
        *,
        users: int,
        duration: float,
        warmup: float,
        rate_per_user: float = 0.0,
        retry_after_max: float = 0.0,
        expected_rate: float | None = None,
        bucket_s: float = 0.0,
        name: str | None = None,
    ) -> dict[str, Any]:
        """Load one server for `duration` s with `users` locust users, verify, summarise.

        Users send back to back, or at `rate_per_user`/s; after a 503 they wait its
        Retry-After, up to `retry_after_max` s (0: retry at once, to keep up the pressure).

        `expected_rate` (default: the best rate seen so far) sizes the pre-built requests;
        `bucket_s` > 0 adds a throughput/latency/RSS timeline in buckets of that many seconds.
        """
        timeline = bucket_s > 0
        if series.reset_per_phase and series.phases:
            reset_scepserver(series.handle, CHALLENGE)
            series.serials.clear()
        if rate_per_user and not expected_rate:
            need = math.ceil(users * rate_per_user * duration * 1.05) + 2 * users  # paced: exact
        else:
            need = math.ceil((expected_rate or series.est_rate) * duration * 1.3) + 2 * users
        self.build(series, need - len(series.unsent))
        base = f"{series.label}-{name or f'c{users}'}-{len(series.phases)}"
        phase_dir = self.workdir / base
        rerun = 0
        while phase_dir.exists():  # a phase rerun after it ran out of requests
            rerun += 1
            phase_dir = self.workdir / f"{base}-rerun{rerun}"
        phase_dir.mkdir(parents=True)
        sent = list(series.unsent)
        write_requests(phase_dir / "requests-0.pkl", sent)
        env = {
            **os.environ,
            "BENCH_REQUESTS": str(phase_dir / "requests-{index}.pkl"),
            "BENCH_OUT": str(phase_dir),
            "BENCH_RATE_PER_USER": str(rate_per_user),
            "BENCH_RETRY_AFTER_MAX": str(retry_after_max),
        }
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
        cmd += ["-u", str(users), "-r", str(users), "--run-time", f"{math.ceil(duration)}s"]
        cmd += ["--host", series.handle.url, "--only-summary", "--loglevel", "WARNING"]

        procs = series.handle.processes()
        sampler = RssSampler([series.handle], interval=1.0 if timeline else 0.25)
        cpu_before = cpu_seconds(procs)
        db_cpu = series.handle.database_cpu
        db_before = db_cpu() if db_cpu else 0.0
        host_before = host_cpu_seconds()
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        sampler.start()
        scraper = None
        if self.scrape_every > 0 and series.handle.name == "hsmscep":
            scraper = Scraper(series.handle.url, self.scrape_every)
            scraper.start()
        wall_start = time.time()
        with (phase_dir / "locust.log").open("wb") as log:
            # cwd = phase dir: locust must not pick up a locust.conf/pyproject from elsewhere
            proc = subprocess.Popen(cmd, cwd=phase_dir, env=env, stdout=log, stderr=log)
            try:
                proc.wait(timeout=duration + LOCUST_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        wall = time.time() - wall_start
        scrapes = scraper.stop() if scraper is not None else None
        sampler.stop()
        cpu_used = cpu_seconds(series.handle.processes()) - cpu_before
        db_used = db_cpu() - db_before if db_cpu else 0.0
        host_after = host_cpu_seconds()
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Reaped children since `before` are exactly the locust process: the load generator.
        loadgen_cpu = (children_after.ru_utime - children_before.ru_utime) + (
            children_after.ru_stime - children_before.ru_stime
        )
        state_path = phase_dir / "state-0.json"
        if not state_path.exists():
            tail = (phase_dir / "locust.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"locust wrote no results for {phase_dir.name}:\n{tail}")
        state = json.loads(state_path.read_text())

        # Unsent requests stay fresh for the next phase: those never read, and 503-ed ones.
        by_txid = {r[0]: r for r in sent[: state["popped"]]}
        series.unsent = deque(sent[state["popped"] :])
        series.unsent.extend(by_txid[t] for t in state["recycled"] if t in by_txid)

        result = self._summarise(series, phase_dir, state, duration, warmup, bucket_s)
        result.update(
            users=users,
            rate_per_user=rate_per_user,
            retry_after_max=retry_after_max,
            duration_s=duration,
            wall_s=round(wall, 2),
            locust_exit_code=proc.returncode,
            server_cpu_s=round(cpu_used, 3),
            server_cpu_util=round(cpu_used / wall, 3) if wall else None,
            loadgen_cpu_s=round(loadgen_cpu, 3),
            # CPU that neither the server nor locust used: other work on the box skews results.
            other_cpu_s=round(host_after[0] - host_before[0] - cpu_used - db_used - loadgen_cpu, 2),
            steal_cpu_s=round(host_after[1] - host_before[1], 2),
            cpu_ms_per_enrollment=(
                round(1000 * cpu_used / result["enrollments"], 3) if result["enrollments"] else None
            ),
            # The PostgreSQL server's CPU in the phase (it shares the box; 0 for SQLite).
            database_cpu_s=round(db_used, 3),
            database_cpu_ms_per_enrollment=(
                round(1000 * db_used / result["enrollments"], 3) if result["enrollments"] else None
            ),
            peak_rss_mb=_rss_by_process(series.handle, sampler.peak[series.label]),
            peak_rss_total_mb=round(
                max((v for _, v in sampler.timeline[series.label]), default=0) / 2**20, 1
            ),
        )
        if scrapes is not None:
            result["metrics_scrapes"] = scrapes
        if timeline:
            result["rss_timeline_mb"] = [
                (round(t - wall_start, 1), round(v / 2**20, 1))
                for t, v in sampler.timeline[series.label]
            ]
        if result["enrollments_per_s"]:
            series.est_rate = max(series.est_rate, result["enrollments_per_s"])
        (phase_dir / "requests-0.pkl").unlink(missing_ok=True)  # the bulk of the phase's bytes
        series.phases.append(result)
        return result

    def _summarise(
        self,
        series: Series,
        phase_dir: Path,
        state: dict[str, Any],
        duration: float,
        warmup: float,
        bucket_s: float,
    ) -> dict[str, Any]:
        status: Counter[int] = Counter()
        retry_after_missing = 0
        conn_errors: Counter[str] = Counter()
        timing: dict[str, tuple[float, float]] = {}  # txid of a 200 -> (end time, latency ms)
        all_latency: list[tuple[float, float]] = []
        first_start = math.inf

        def bodies() -> Iterator[tuple[str, bytes]]:
            nonlocal retry_after_missing, first_start
            for txid, code, start, latency_ms, retry_after, body, error in read_stream(
                phase_dir / "responses-0.pkl"
            ):
                status[code] += 1
                first_start = min(first_start, start)
                end = start + latency_ms / 1000
                all_latency.append((end, latency_ms))
                if code == 200:
                    timing[txid] = (end, latency_ms)
                    yield txid, body
                elif code == 503 and not retry_after:
                    retry_after_missing += 1
                elif code == 0:
                    conn_errors[(error or "?")[:120]] += 1

        kinds: Counter[str] = Counter()
        fail_info: Counter[str] = Counter()
        invalid: Counter[str] = Counter()
        ok: list[tuple[float, float, int]] = []  # end time, latency, serial
        for outcome in self.verify(series, bodies()):
            kinds[outcome.kind] += 1
            if outcome.kind == "ok":
                end, latency = timing[outcome.transaction_id]
                ok.append((end, latency, outcome.serial or 0))
            elif outcome.kind == "failure":
                fail_info[str(outcome.detail)] += 1
            elif outcome.kind == "invalid":
                invalid[str(outcome.detail)[:160]] += 1

        # A serial the server already gave out (in this phase or an earlier one) is not an
        # enrollment: two certificates with one issuer and serial break revocation.
        ok.sort()
        unique: list[tuple[float, float]] = []
        duplicates = 0
        for end, latency, serial in ok:
            if serial in series.serials:
                duplicates += 1
            else:
                series.serials.add(serial)
                unique.append((end, latency))

        t0 = first_start if first_start < math.inf else time.time()
        window_start = t0 + warmup
        window_end = t0 + duration
        if state.get("exhausted_at"):
            window_end = min(window_end, float(state["exhausted_at"]))
        window = max(window_end - window_start, 1e-9)
        in_window = [lat for end, lat in unique if window_start <= end <= window_end]
        verified_in_window = sum(1 for end, _, _ in ok if window_start <= end <= window_end)
        any_in_window = [lat for end, lat in all_latency if window_start <= end <= window_end]
        sent_count = sum(status.values())
        other_5xx = sum(n for c, n in status.items() if 500 <= c < 600 and c != 503)
        result: dict[str, Any] = {
            "window_s": round(window, 2),
            "exhausted_requests": bool(state.get("exhausted_at")),
            "enrollments_per_s": round(len(in_window) / window, 2),
            "verified_per_s": round(verified_in_window / window, 2),
            "responses_per_s": round(len(any_in_window) / window, 2),
            "latency_ms": _percentiles(in_window),
            "latency_all_responses_ms": _percentiles(any_in_window),
            "sent": sent_count,
            "enrollments": len(unique),
            "verified_ok": kinds["ok"],
            "duplicate_serials": duplicates,
            "scep_failure": kinds["failure"],
            "scep_failure_info": dict(fail_info),
            "scep_pending": kinds["pending"],
            "invalid_responses": kinds["invalid"],
            "invalid_reasons": dict(invalid.most_common(5)),
            "http_status": {str(c): n for c, n in sorted(status.items())},
            "http_503": status[503],
            "http_503_without_retry_after": retry_after_missing,
            "http_5xx_other": other_5xx,
            "http_other": sent_count - status[200] - status[503] - other_5xx - status[0],
            "connection_errors": sum(conn_errors.values()),
            "connection_error_kinds": dict(conn_errors.most_common(3)),
        }
        result["errors"] = (
            result["scep_failure"]
            + result["scep_pending"]
            + result["invalid_responses"]
            + result["duplicate_serials"]
            + result["http_5xx_other"]
            + result["http_other"]
            + result["connection_errors"]
        )
        if bucket_s:
            result["buckets"] = _buckets(unique, all_latency, t0, duration, bucket_s)
        return result


# ---------------------------------------------------------------------------- helpers


def _percentiles(latencies: Sequence[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(latencies)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 2)

    return {"p50": pick(0.50), "p99": pick(0.99), "max": round(ordered[-1], 2)}


def _buckets(
    unique: Sequence[tuple[float, float]],
    all_latency: Sequence[tuple[float, float]],
    t0: float,
    duration: float,
    size: float,
) -> list[dict[str, Any]]:
    """Enrollments/s, latency and response count per `size`-second slice of the phase."""
    out = []
    for i in range(max(1, int(duration // size))):
        lo, hi = t0 + size * i, t0 + size * (i + 1)
        lat = [lat for end, lat in unique if lo <= end < hi]
        out.append(
            {
                "t_s": round(size * (i + 1), 1),
                "enrollments_per_s": round(len(lat) / size, 2),
                "latency_ms": _percentiles(lat),
                "responses_per_s": round(
                    sum(1 for end, _ in all_latency if lo <= end < hi) / size, 2
                ),
            }
        )
    return out


def _rss_by_process(handle: ServerHandle, peaks: dict[int, int]) -> list[dict[str, Any]]:
    """Peak RSS per server process: sampled during the phase, and the kernel's lifetime HWM."""
    out = []
    for p in handle.processes():
        hwm = peak_rss_hwm(p.pid)
        out.append(
            {
                "pid": p.pid,
                "role": "main" if p.pid == handle.proc.pid else "worker",
                "phase_peak_mb": round(peaks.get(p.pid, 0) / 2**20, 1),
                "lifetime_peak_mb": round(hwm / 2**20, 1) if hwm else None,
            }
        )
    return out


def _host_info() -> dict[str, Any]:
    def version(cmd: list[str]) -> str | None:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return None

    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import cryptography
    import locust

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "cryptography": cryptography.__version__,
        "locust": locust.__version__,
        "softhsm2": version(["softhsm2-util", "--version"]),
        "scepserver": version(["scepserver", "-version"]),
    }


def load_average() -> tuple[float, float, float]:
    """/proc/loadavg: runnable tasks over 1, 5 and 15 minutes (other work on the box)."""
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def _level_plan(args: argparse.Namespace) -> tuple[list[int], float, float]:
    """Concurrency levels, seconds per phase and warm-up seconds; --quick shortens them."""
    levels = args.levels or ("1,8,32" if args.quick else "1,8,32,64,256")
    duration = args.duration or (5.0 if args.quick else 15.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    return [int(x) for x in levels.split(",")], duration, warmup


# ---------------------------------------------------------------------------- modes


def run_compare(args: argparse.Namespace, bench: Bench, stamp: str) -> dict[str, Any]:
    """Every series at every concurrency, interleaved so drift hits all servers alike."""
    levels, duration, warmup = _level_plan(args)
    scenarios = args.scenarios.split(",")
    series: list[Series] = []
    ceilings: dict[str, Any] = {}
    servers = args.servers.split(",")
    built: list[variants.Variant] = []
    for spec in args.variant:
        print(
            f"building variant {spec.name} from {spec.rev}"
            + (f" + {spec.patch}" * bool(spec.patch))
        )
        built.append(variants.build(spec, bench.workdir))
    stores = args.stores.split(",")
    prefills = [int(n) for n in args.prefill.split(",")]
    with ExitStack() as stack:
        pg = stack.enter_context(pgstore.postgres()) if "postgresql" in stores else None
        stack.callback(lambda: [s.handle.stop() for s in series])
        plan = ((sc, st, n) for sc in scenarios for st in stores for n in prefills)
        for scenario, store, rows in plan if "hsmscep" in servers else []:
            # One series per store and pre-fill: `--prefill 0,1000000` puts the empty and the
            # full store of each backend in the same interleaved phases.
            tag = ("pg" if store == "postgresql" else "") + (
                f"{rows}r" if len(prefills) > 1 else ""
            )
            workdir = bench.workdir / f"hsmscep-{tag}{scenario}"
            env = None
            if store == "postgresql":
                if pg is None:
                    continue
                env = pg.database(f"bench_{tag}{scenario}", rows)
            elif rows:
                pgstore.prefill_sqlite(workdir, rows)
            handle = start_hsmscep(
                scenario, workdir, free_port(), CHALLENGE, args.workers, store_env=env
            )
            handle.prefill = rows
            handle.database_cpu = pg.cpu_seconds if env is not None and pg is not None else None
            series.append(Series(handle, f"{stamp}-h{tag}{scenario}"))
        # Variants run on SQLite: they compare code, not stores. With one --prefill count
        # they get it too, so that code for large stores can be compared.
        variant_rows = prefills[0] if len(prefills) == 1 else 0
        for v, scenario in ((v, sc) for v in built for sc in scenarios):
            workdir = bench.workdir / f"hsmscep-{v.spec.name}-{scenario}"
            if variant_rows:
                pgstore.prefill_sqlite(workdir, variant_rows)
            handle = start_hsmscep(
                scenario,
                workdir,
                free_port(),
                CHALLENGE,
                args.workers,
                binary=v.binary,
                variant=v.spec.name,
            )
            handle.prefill = variant_rows
            series.append(Series(handle, f"{stamp}-{v.spec.name}-h{scenario}"))
        if "scepserver" in servers:
            handle = start_scepserver(bench.workdir / "scepserver", free_port(), CHALLENGE)
            series.append(Series(handle, f"{stamp}-s", reset_per_phase=True))
        measure_ceilings(series, ceilings, args.ceiling_seconds)
        for users, rnd in ((u, r) for u in levels for r in range(args.repeat)):
            # Each round starts one series later, so no series always follows the same one.
            for s in series[rnd % len(series) :] + series[: rnd % len(series)]:
                # Clients that honour Retry-After (capped), as real ones pace their retries.
                kw = {"users": users, "duration": duration, "warmup": warmup, "retry_after_max": 5}
                load_before = load_average()
                r = bench.run_phase(s, **kw)
                if r["exhausted_requests"] and r["window_s"] < 0.6 * (duration - warmup):
                    # Ran out of pre-built requests early: build for the rate now known, rerun.
                    s.phases.pop()
                    r = bench.run_phase(s, **kw)
                r.update(round=rnd, loadavg_before=load_before, loadavg_after=load_average())
                print(report.phase_line(s.label, r) + f" round={rnd} load={load_before[0]:.2f}")
        measure_ceilings(series, ceilings, args.ceiling_seconds)
    result = {
        "mode": "compare",
        "prefilled_certificates": prefills if len(prefills) > 1 else prefills[0],
        "levels": levels,
        "duration_s": duration,
        "warmup_s": warmup,
        "repeat": args.repeat,
        "variants": {v.spec.name: v.describe() for v in built},
        "ceiling": ceilings,
        "series": {
            s.label: {
                "server": s.handle.name,
                "variant": s.handle.variant,
                "scenario": s.handle.scenario,
                "store": s.handle.store,
                "prefill": s.handle.prefill,
                "levels": s.phases,
            }
            for s in series
        },
    }
    cpusplit.annotate(result)
    return result


def measure_ceilings(series: list[Series], ceilings: dict[str, Any], seconds: float) -> None:
    """The HSM ceiling of each hsmscep instance (its own token and keys), servers idle.

    Measured before and after the load phases: the higher one stands as the ceiling (it is a
    capacity bound; a lower reading means something else had the cores).
    """
    for s in series:
        if s.handle.hsm is None:
            continue
        print(f"HSM ceiling for {s.label} ({seconds:.0f} s per operation)")
        run = ceiling.measure_scenario(s.handle.hsm, s.handle.scenario, seconds=seconds)
        entry = ceilings.setdefault(s.handle.scenario, {"runs": []})
        entry["runs"].append(run)
        best = max(entry["runs"], key=lambda r: r["enrollments_per_s"])
        entry.update(operations=best["operations"], enrollments_per_s=best["enrollments_per_s"])
        entry["hsm_cpu_ms_per_enrollment"] = min(
            r["hsm_cpu_ms_per_enrollment"] for r in entry["runs"]
        )


def _peak_from_results(label: str) -> float | None:
    """hsmscep's peak enrollments/s in the newest compare results file that has it."""
    for path in sorted(RESULTS_DIR.glob("*.json"), reverse=True):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("mode") == "compare" and label in data.get("series", {}):
            rates = [p["enrollments_per_s"] for p in data["series"][label]["levels"]]
            if rates and max(rates) > 0:
                print(f"peak of {label}: {max(rates):.0f}/s from {path.name}")
                return float(max(rates))
    return None


def run_sustained(args: argparse.Namespace, bench: Bench, stamp: str) -> dict[str, Any]:
    """--soak (70 % of peak, 10 min) or --overload (4x peak), hsmscep only."""
    scenario = args.scenarios.split(",")[0]
    handle = start_hsmscep(
        scenario, bench.workdir / f"hsmscep-{scenario}", free_port(), CHALLENGE, args.workers
    )
    s = Series(handle, f"{stamp}-h{scenario}")
    try:
        peak = args.peak or _peak_from_results(s.label)
        if not peak:
            print("no peak known: measuring it at concurrency 32 for 15 s")
            peak = bench.run_phase(s, users=32, duration=15, warmup=3, name="probe")[
                "enrollments_per_s"
            ]
            s.phases.clear()
        if args.soak:
            minutes = 0.5 if args.quick else args.soak_minutes
            users, target, duration = 64, 0.7 * peak, 60 * minutes
        else:
            users, target = args.overload_users, 4 * peak
            duration = 15.0 if args.quick else args.overload_seconds
        print(f"{'soak' if args.soak else 'overload'}: {target:.0f}/s offered for {duration:.0f} s")
        r = bench.run_phase(
            s,
            users=users,
            duration=duration,
            warmup=min(30.0, duration / 10),
            rate_per_user=target / users,
            # Overload: 503s are recycled, so fresh requests are needed only for what the
            # server accepts, about its peak.
            expected_rate=None if args.soak else 1.2 * peak,
            bucket_s=60.0 if args.soak and not args.quick else 5.0,
            name="soak" if args.soak else "overload",
        )
    finally:
        handle.stop()
    checks = report.soak_checks(r, target) if args.soak else report.overload_checks(r, peak)
    return {
        "mode": "soak" if args.soak else "overload",
        "scenario": scenario,
        "peak_enrollments_per_s": peak,
        "offered_per_s": target,
        "result": r,
        "checks": checks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--soak", action="store_true", help="hsmscep at 70%% of peak")
    mode.add_argument("--overload", action="store_true", help="hsmscep offered 4x peak")
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--scenarios", default="rsa2048,p256", help="CA keys: rsa2048,p256")
    parser.add_argument("--levels", default=None, help="concurrency (1,8,32,64,256)")
    parser.add_argument("--duration", type=float, default=None, help="s per phase (15)")
    parser.add_argument("--warmup", type=float, default=None, help="s not measured (3)")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0)
    parser.add_argument("--servers", default="hsmscep,scepserver", help="which to compare")
    parser.add_argument(
        "--stores", default="sqlite,postgresql", help="hsmscep's store backends: sqlite,postgresql"
    )
    parser.add_argument(
        "--prefill",
        default="0",
        help="certificates already in every store (1000000); a list (0,1000000) runs each",
    )
    parser.add_argument("--workers", default="auto", help="hsmscep serve --workers")
    parser.add_argument("--keys", type=int, default=256, help="cached client keys to use")
    parser.add_argument("--peak", type=float, default=None, help="soak/overload: peak /s")
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument("--overload-seconds", type=float, default=60.0)
    parser.add_argument(
        "--overload-users", type=int, default=512, help="closed-loop users offering 4x peak"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=variants.parse_spec,
        metavar="NAME=REV[:PATCH]",
        help="also run hsmscep from git revision REV (+ patch), interleaved; repeatable",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds per concurrency level (compare)"
    )
    parser.add_argument(
        "--scrape",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="GET hsmscep's /metrics every SECONDS during each phase (0: never)",
    )
    args = parser.parse_args(argv)
    exit_on_sigterm()
    if args.quick:
        args.ceiling_seconds = min(args.ceiling_seconds, 1.0)

    if args.variant and (args.soak or args.overload):
        parser.error("--variant is for compare runs")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    load_at_start = load_average()
    workdir = Path(tempfile.mkdtemp(prefix=f"hsmscep-bench-{stamp}-"))
    started = time.time()
    bench = Bench(workdir, args.keys)
    bench.scrape_every = args.scrape
    try:
        if args.soak or args.overload:
            data = run_sustained(args, bench, stamp)
        else:
            data = run_compare(args, bench, stamp)
    finally:
        bench.close()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    data.update(
        started_utc=stamp,
        elapsed_s=round(time.time() - started, 1),
        quick=args.quick,
        host=_host_info(),
        loadavg_start=load_at_start,
        loadavg_end=load_average(),
        summary=report.summarise(data),
    )
    many = data["mode"] == "compare" and (data["variants"] or data["repeat"] > 1)
    if many:
        data["summary"]["variants"] = variant_report.summarise(data)
    RESULTS_DIR.mkdir(exist_ok=True)
    json_path = (
        RESULTS_DIR / f"{stamp}{'-' + data['mode'] if data['mode'] != 'compare' else ''}.json"
    )
    json_path.write_text(json.dumps(data, indent=1))
    png = (variant_report.plot if many else report.plot)(data, json_path.with_suffix(".png"))
    print(report.table(data) + (variant_report.table(data) if many else ""))
    print(f"\nresults: {json_path}" + (f"\nplot:    {png}" if png else ""))
    return 0 if report.passed(data) else 1


if __name__ == "__main__":
    sys.exit(main())
