"""HSM latency bench: enrollments/s and p99 against latency added to every private-key
operation (0, 1, 2, 5, 10 ms), for the default pool and hand-tuned pool sizes.

hsmscep runs on bench/p11shim.c (built here with the system compiler), a PKCS#11 module that
forwards to SoftHSM2 and sleeps the configured time in C_Sign/C_Decrypt, as a network HSM's
round trip would. Writes bench/results/<stamp>-latency.json and .png, prints a table.

    python -m bench.latency --quick            # smoke: 0 and 2 ms, default pool, 5 s phases
    python -m bench.latency                    # 0,1,2,5,10 ms x default,16,32; 15 s phases

Ratios (rate at d ms / the same pool's rate at 0 ms) only mean something on a quiet box.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import ceiling, p11shim
from bench.driver import CHALLENGE, RESULTS_DIR, Bench, Series
from bench.servers import free_port, start_hsmscep
from hsmscep.hsm.devtoken import find_softhsm


def run(args: argparse.Namespace, bench: Bench, stamp: str) -> dict[str, Any]:
    shim = p11shim.build(bench.workdir / "shim")
    delays = [float(d) for d in args.delays.split(",")]
    pools = args.pools.split(",")
    token_dir = bench.workdir / "hsmscep"  # one token, keys and CA for every phase
    series: dict[str, list[dict[str, Any]]] = {}
    hsm_cpu_ms: float | None = None
    for pool in pools:
        for delay in delays:
            env = {
                "HSMSCEP_PKCS11_MODULE": str(shim),
                "P11SHIM_MODULE": find_softhsm(),
                "P11SHIM_DELAY_US": str(int(delay * 1000)),
            }
            if pool != "default":
                env["HSMSCEP_SERVER_POOL_SIZE"] = pool
            handle = start_hsmscep(
                args.scenario, token_dir, free_port(), CHALLENGE, args.workers, env
            )
            try:
                s = Series(handle, f"{stamp}-p{pool}-d{delay:g}")
                if hsm_cpu_ms is None and handle.hsm is not None:
                    # SoftHSM2's own CPU per enrollment (three operations, every core busy).
                    best = ceiling.measure_scenario(handle.hsm, args.scenario, seconds=2.0)
                    hsm_cpu_ms = 1000 * bench.cpus / best["enrollments_per_s"]
                r = bench.run_phase(s, users=args.users, duration=args.duration, warmup=args.warmup)
            finally:
                handle.stop()
            row = {
                "delay_ms": delay,
                "enrollments_per_s": r["enrollments_per_s"],
                "p99_ms": r["latency_ms"].get("p99"),
                "errors": r["errors"],
                "http_503": r["http_503"],
                "cpu_ms_per_enrollment": r.get("cpu_ms_per_enrollment"),
                "peak_rss_mb": r.get("peak_rss_mb"),
            }
            series.setdefault(pool, []).append(row)
            print(
                f"pool={pool:>7} delay={delay:>4g} ms  {row['enrollments_per_s']:>8.1f}/s  "
                f"p99 {row['p99_ms']} ms  errors {row['errors']}"
            )
    for rows in series.values():
        base = next((r["enrollments_per_s"] for r in rows if r["delay_ms"] == 0), None)
        for r in rows:
            r["ratio_to_zero_delay"] = round(r["enrollments_per_s"] / base, 3) if base else None
    zero = [r for r in series.get("default", []) if r["delay_ms"] == 0]
    outside = None
    if zero and zero[0]["cpu_ms_per_enrollment"] and hsm_cpu_ms is not None:
        outside = round(zero[0]["cpu_ms_per_enrollment"] - hsm_cpu_ms, 3)
    return {
        "mode": "latency",
        "users": args.users,
        "scenario": args.scenario,
        "workers": args.workers,
        "duration_s": args.duration,
        "pools": series,
        "hsm_cpu_ms_per_enrollment": round(hsm_cpu_ms, 3) if hsm_cpu_ms else None,
        "cpu_ms_per_enrollment_outside_hsm": outside,
    }


def plot(data: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (rate, p99) = plt.subplots(1, 2, figsize=(11, 4))
    for pool, rows in data["pools"].items():
        xs = [r["delay_ms"] for r in rows]
        rate.plot(xs, [r["enrollments_per_s"] for r in rows], marker="o", label=f"pool {pool}")
        p99.plot(xs, [r["p99_ms"] or 0 for r in rows], marker="o", label=f"pool {pool}")
    rate.set(xlabel="added latency per private-key op (ms)", ylabel="enrollments/s")
    p99.set(xlabel="added latency per private-key op (ms)", ylabel="p99 latency (ms)")
    for ax in (rate, p99):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"hsmscep vs HSM latency, c={data['users']}, {data['scenario']} CA")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke: 0,2 ms, default pool")
    parser.add_argument("--delays", default="0,1,2,5,10", help="ms added per operation")
    parser.add_argument("--pools", default="default,16,32", help="default or pool_size values")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--scenario", default="rsa2048")
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--keys", type=int, default=64)
    args = parser.parse_args(argv)
    if args.quick:
        args.delays, args.pools, args.duration, args.warmup = "0,2", "default", 5.0, 1.0
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    workdir = Path(tempfile.mkdtemp(prefix=f"hsmscep-latency-{stamp}-"))
    bench = Bench(workdir, args.keys)
    try:
        data = run(args, bench, stamp)
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    data.update(started_utc=stamp, quick=args.quick)
    RESULTS_DIR.mkdir(exist_ok=True)
    json_path = RESULTS_DIR / f"{stamp}-latency.json"
    json_path.write_text(json.dumps(data, indent=1))
    png = plot(data, json_path.with_suffix(".png"))
    print(f"results: {json_path}" + (f"\nplot:    {png}" if png else ""))
    return 0 if all(r["errors"] == 0 for rows in data["pools"].values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
