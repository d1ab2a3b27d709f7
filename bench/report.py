"""Turn driver results into a summary, pass/fail checks, a text table and a PNG plot."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.variant_report import paired_ratios

PEER = "scepserver-rsa2048"


def phase_line(label: str, r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return (
        f"  {label:<20} c={r['users']:<4} {r['enrollments_per_s']:>8.1f}/s "
        f"p50={_ms(lat['p50'])} p99={_ms(lat['p99'])} errors={r['errors']} "
        f"503={r['http_503']} cpu={_num(r['cpu_ms_per_enrollment'])} ms/enr"
        + (f" +db {_num(r['database_cpu_ms_per_enrollment'])}" if r.get("database_cpu_s") else "")
    )


def _ms(v: float | None) -> str:
    return f"{v:.1f}ms" if v is not None else "-"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return format(v, fmt) if v is not None else "-"


# ---------------------------------------------------------------------------- summary


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    if data["mode"] != "compare":
        required = [c["ok"] for c in data["checks"].values() if c.get("required", True)]
        return {"passed": all(required)}
    out: dict[str, Any] = {"series": {}}
    peer = data["series"].get(PEER)
    peer_rates = {p["users"]: p["enrollments_per_s"] for p in peer["levels"]} if peer else {}
    # scepserver's answers that verify, counting certificates whose serial it reused: the
    # kinder reading of its throughput, reported next to the strict one.
    peer_verified = {p["users"]: p["verified_per_s"] for p in peer["levels"]} if peer else {}
    for label, s in data["series"].items():
        levels = s["levels"]
        best = max(levels, key=lambda p: p["enrollments_per_s"])
        entry: dict[str, Any] = {
            "peak_enrollments_per_s": best["enrollments_per_s"],
            "peak_at_concurrency": best["users"],
            "cpu_ms_per_enrollment_at_peak": best["cpu_ms_per_enrollment"],
            "cpu_ms_outside_hsm_at_peak": best.get("cpu_ms_outside_hsm_per_enrollment"),
            "max_process_rss_mb": max(
                (p["phase_peak_mb"] for lv in levels for p in lv["peak_rss_mb"]), default=None
            ),
            "errors": sum(p["errors"] for p in levels),
            "scep_failure": sum(p["scep_failure"] for p in levels),
            "duplicate_serials": sum(p["duplicate_serials"] for p in levels),
            "http_503": sum(p["http_503"] for p in levels),
        }
        if s["server"] == "hsmscep":
            if peer_rates:
                # None where scepserver completed no enrollment at all (no finite ratio).
                entry["ratio_vs_scepserver"] = {
                    str(p["users"]): (
                        round(p["enrollments_per_s"] / peer_rates[p["users"]], 2)
                        if peer_rates[p["users"]]
                        else None
                    )
                    for p in levels
                    if p["users"] in peer_rates
                }
                entry["ratio_vs_scepserver_verified_incl_duplicate_serials"] = {
                    str(p["users"]): (
                        round(p["enrollments_per_s"] / peer_verified[p["users"]], 2)
                        if peer_verified[p["users"]]
                        else None
                    )
                    for p in levels
                    if p["users"] in peer_verified
                }
                peer_peak = max(peer_rates.values())
                if peer_peak:
                    entry["peak_ratio_vs_scepserver_peak"] = round(
                        best["enrollments_per_s"] / peer_peak, 2
                    )
            ceiling = data["ceiling"].get(s["scenario"])
            if ceiling:
                entry["hsm_ceiling_enrollments_per_s"] = round(ceiling["enrollments_per_s"], 1)
                entry["fraction_of_hsm_ceiling"] = round(
                    best["enrollments_per_s"] / ceiling["enrollments_per_s"], 3
                )
        rows = s.get("prefill", 0)
        filled = f"-{rows}" if rows else ""
        if s["server"] == "hsmscep" and s.get("store") == "postgresql" and not s["variant"]:
            # The same run, the same CA key and pre-fill: PostgreSQL's rate over SQLite's.
            sqlite = data["series"].get(f"hsmscep{filled}-{s['scenario']}")
            if sqlite is not None:
                entry["ratio_vs_sqlite"] = _ratios(levels, sqlite["levels"])
                entry["ratio_vs_sqlite_paired"] = paired_ratios(levels, sqlite["levels"])
        if s["server"] == "hsmscep" and rows and not s["variant"]:
            # The same backend empty in the same run: the cost of a large store.
            pg = "-pg" if s.get("store") == "postgresql" else ""
            empty = data["series"].get(f"hsmscep{pg}-{s['scenario']}")
            if empty is not None:
                entry["ratio_vs_empty_store"] = _ratios(levels, empty["levels"])
                entry["ratio_vs_empty_store_paired"] = paired_ratios(levels, empty["levels"])
                full_p99, empty_p99 = _medians(levels, _p99), _medians(empty["levels"], _p99)
                entry["p99_ms_full_and_empty_store"] = {
                    str(u): [full_p99[u], empty_p99.get(u)] for u in full_p99
                }
        out["series"][label] = entry
    out["passed"] = all(
        e["errors"] == 0 for label, e in out["series"].items() if label.startswith("hsmscep")
    )
    return out


def _ratios(levels: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, float]:
    """Per concurrency, the median rate of `levels` over that of `base` (rounds pooled)."""
    mine, theirs = _medians(levels), _medians(base)
    return {str(u): round(r / theirs[u], 3) for u, r in mine.items() if theirs.get(u)}


def _rate(phase: dict[str, Any]) -> float | None:
    return float(phase["enrollments_per_s"])


def _p99(phase: dict[str, Any]) -> float | None:
    p99 = phase.get("latency_ms", {}).get("p99")
    return None if p99 is None else float(p99)


def _medians(
    levels: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None] = _rate
) -> dict[int, float]:
    """Per concurrency, the median of `value` over the rounds."""
    by_users: dict[int, list[float]] = {}
    for p in levels:
        v = value(p)
        if v is not None:
            by_users.setdefault(p["users"], []).append(v)
    return {u: round(statistics.median(vs), 2) for u, vs in by_users.items()}


def passed(data: dict[str, Any]) -> bool:
    return bool(data["summary"]["passed"])


# ---------------------------------------------------------------------------- checks


def _rss_growth(r: dict[str, Any]) -> tuple[float, float]:
    """(MB, fraction) from the mean RSS of the 2nd tenth of the run to that of the last."""
    tl = [v for _, v in r.get("rss_timeline_mb", [])]
    if len(tl) < 10:
        return 0.0, 0.0
    tenth = len(tl) // 10
    early = statistics.fmean(tl[tenth : 2 * tenth])
    late = statistics.fmean(tl[-tenth:])
    return round(late - early, 1), round((late - early) / early, 3) if early else 0.0


def soak_checks(r: dict[str, Any], target: float) -> dict[str, dict[str, Any]]:
    """Steady throughput, flat RSS, zero errors (and no shedding) at 70 % of peak."""
    rates = [b["enrollments_per_s"] for b in r.get("buckets", [])]
    steady = rates[1:] or rates  # the first bucket holds the ramp-up
    median = statistics.median(steady) if steady else 0.0
    spread = max((abs(x - median) / median for x in steady), default=1.0) if median else 1.0
    growth_mb, growth = _rss_growth(r)
    return {
        "throughput_steady": {
            "ok": bool(steady) and spread <= 0.10 and median >= 0.9 * target,
            "detail": f"buckets {min(steady, default=0):.0f}..{max(steady, default=0):.0f}/s, "
            f"median {median:.0f}/s, offered {target:.0f}/s, max deviation {spread:.1%}",
        },
        "rss_flat": {
            "ok": growth_mb <= 20 or growth <= 0.10,
            "detail": f"{growth_mb:+.1f} MB ({growth:+.1%}) from the 2nd tenth to the last",
        },
        "zero_errors": {
            "ok": r["errors"] == 0 and r["http_503"] == 0,
            "detail": f"errors={r['errors']} http_503={r['http_503']} status={r['http_status']}",
        },
    }


def overload_checks(r: dict[str, Any], peak: float) -> dict[str, dict[str, Any]]:
    """Beyond capacity only 503 + Retry-After; no other 5xx; bounded RSS; goodput held."""
    growth_mb, growth = _rss_growth(r)
    return {
        "only_200_or_503": {
            "ok": r["http_5xx_other"] == 0 and r["http_other"] == 0 and r["connection_errors"] == 0,
            "detail": f"status={r['http_status']} connection_errors={r['connection_errors']}",
        },
        "503_has_retry_after": {
            "ok": r["http_503_without_retry_after"] == 0,
            "detail": f"{r['http_503']} x 503, {r['http_503_without_retry_after']} lack it",
        },
        "sheds_load": {
            "ok": r["http_503"] > 0,
            "detail": "503s were sent" if r["http_503"] else "no 503 at 4x peak: it queued",
        },
        "responses_verify": {
            "ok": r["invalid_responses"] == 0 and r["duplicate_serials"] == 0,
            "detail": f"invalid={r['invalid_responses']} dup={r['duplicate_serials']} "
            f"FAILURE={r['scep_failure']}",
        },
        "rss_bounded": {
            "ok": growth_mb <= 20 or growth <= 0.10,
            "detail": f"{growth_mb:+.1f} MB ({growth:+.1%}); peak {r['peak_rss_total_mb']} MB",
        },
        # Informational: on a box shared with the load generator, goodput also falls because
        # locust's 512 users take CPU from the server.
        "goodput_held": {
            "ok": r["enrollments_per_s"] >= 0.7 * peak,
            "required": False,
            "detail": f"{r['enrollments_per_s']:.0f}/s verified = "
            f"{r['enrollments_per_s'] / peak:.0%} of peak {peak:.0f}/s; "
            f"{r['responses_per_s']:.0f} responses/s actually offered",
        },
    }


# ---------------------------------------------------------------------------- text


def table(data: dict[str, Any]) -> str:
    if data["mode"] != "compare":
        r = data["result"]
        lines = [
            f"\n{data['mode']} of hsmscep-{data['scenario']}: offered "
            f"{data['offered_per_s']:.0f}/s (peak {data['peak_enrollments_per_s']:.0f}/s)",
            phase_line(f"hsmscep-{data['scenario']}", r),
        ]
        for name, c in data["checks"].items():
            verdict = ("PASS" if c["ok"] else "FAIL") if c.get("required", True) else "info"
            lines.append(f"  [{verdict}] {name}: {c['detail']}")
        return "\n".join(lines)

    head = (
        f"{'series':<20} {'conc':>4} {'enroll/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ok':>7} "
        f"{'FAILURE':>7} {'dupSN':>6} {'503':>6} {'oth5xx':>6} {'conn':>5} {'invalid':>7} "
        f"{'cpu ms':>7} {'RSS MB':>7}"
    )
    lines = ["", head, "-" * len(head)]
    for label, s in data["series"].items():
        for p in s["levels"]:
            lines.append(
                f"{label:<20} {p['users']:>4} {p['enrollments_per_s']:>9.1f} "
                f"{_num(p['latency_ms']['p50'], '.1f'):>8} "
                f"{_num(p['latency_ms']['p99'], '.1f'):>8} "
                f"{p['enrollments']:>7} {p['scep_failure']:>7} {p['duplicate_serials']:>6} "
                f"{p['http_503']:>6} {p['http_5xx_other']:>6} {p['connection_errors']:>5} "
                f"{p['invalid_responses']:>7} {_num(p['cpu_ms_per_enrollment']):>7} "
                f"{max((x['phase_peak_mb'] for x in p['peak_rss_mb']), default=0):>7.0f}"
            )
    lines.append("")
    for scenario, c in data["ceiling"].items():
        ops = ", ".join(f"{o['role']} {o['ops_per_s']:.0f}/s" for o in c["operations"])
        runs = " / ".join(f"{r['enrollments_per_s']:.0f}" for r in c.get("runs", []))
        lines.append(
            f"HSM ceiling {scenario}: {ops} -> {c['enrollments_per_s']:.0f} enrollments/s"
            f" (before / after the load: {runs})"
        )
    busy = [
        (label, p["users"], p["other_cpu_s"] / p["wall_s"])
        for label, s in data["series"].items()
        for p in s["levels"]
        if p["wall_s"] and p["other_cpu_s"] / p["wall_s"] > 0.15
    ]
    if busy:
        worst = ", ".join(f"{lb} c={u}: {f:.2f}" for lb, u, f in busy[:6])
        lines.append(f"WARNING: other processes used CPU during phases (cores busy): {worst}")
    for label, e in data["summary"]["series"].items():
        extra = ""
        if "fraction_of_hsm_ceiling" in e:
            extra += f", {e['fraction_of_hsm_ceiling']:.0%} of HSM ceiling"
        if "peak_ratio_vs_scepserver_peak" in e:
            extra += f", {e['peak_ratio_vs_scepserver_peak']:.2f}x scepserver's peak"
        lines.append(
            f"{label}: peak {e['peak_enrollments_per_s']:.0f}/s at c={e['peak_at_concurrency']}"
            f"{extra}; errors {e['errors']} (FAILURE {e['scep_failure']}, "
            f"duplicate serials {e['duplicate_serials']})"
        )
        if "ratio_vs_scepserver" in e:
            ratios = " ".join(
                f"c{c}={v:.2f}x" if v is not None else f"c{c}=n/a (scepserver 0/s)"
                for c, v in e["ratio_vs_scepserver"].items()
            )
            lines.append(f"  vs scepserver at equal concurrency: {ratios}")
        if "ratio_vs_scepserver_verified_incl_duplicate_serials" in e:
            ratios = " ".join(
                f"c{c}={v:.2f}x" if v is not None else f"c{c}=n/a"
                for c, v in e["ratio_vs_scepserver_verified_incl_duplicate_serials"].items()
            )
            lines.append(f"  vs scepserver counting its duplicate-serial certificates: {ratios}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plot


def plot(data: dict[str, Any], path: Path) -> Path | None:
    """Two panels, both servers: enrollments/s and p50/p99 latency against concurrency."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if data["mode"] == "compare":
        for label, s in data["series"].items():
            xs = [p["users"] for p in s["levels"]]
            line = left.plot(xs, [p["enrollments_per_s"] for p in s["levels"]], "o-", label=label)
            color = line[0].get_color()
            if any(p["duplicate_serials"] for p in s["levels"]):
                left.plot(
                    xs,
                    [p["verified_per_s"] for p in s["levels"]],
                    ":",
                    color=color,
                    label=f"{label} incl. duplicate serials",
                )
            right.plot(
                xs,
                [p["latency_ms"]["p50"] for p in s["levels"]],
                "o-",
                color=color,
                label=f"{label} p50",
            )
            right.plot(
                xs,
                [p["latency_ms"]["p99"] for p in s["levels"]],
                "s--",
                color=color,
                label=f"{label} p99",
            )
        for scenario, c in data["ceiling"].items():
            left.axhline(c["enrollments_per_s"], linestyle=":", color="grey")
            left.annotate(
                f"HSM ceiling {scenario}", (1, c["enrollments_per_s"]), fontsize=8, va="bottom"
            )
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(data["levels"], [str(c) for c in data["levels"]])
            ax.set_xlabel("concurrent clients")
            ax.grid(True, which="both", alpha=0.3)
        left.set_ylabel("verified enrollments/s")
        left.set_ylim(bottom=0)
        right.set_ylabel("latency of verified enrollments (ms)")
        if any(p["latency_ms"]["p50"] for s in data["series"].values() for p in s["levels"]):
            right.set_yscale("log")
        title = f"hsmscep vs scepserver, {data['host']['cpus']} CPUs, {data['started_utc']}"
    else:
        r = data["result"]
        ts = [b["t_s"] for b in r["buckets"]]
        left.plot(ts, [b["enrollments_per_s"] for b in r["buckets"]], "o-", label="verified")
        left.plot(ts, [b["responses_per_s"] for b in r["buckets"]], "x:", label="all responses")
        left.axhline(data["offered_per_s"], linestyle=":", color="grey", label="offered")
        left.set_xlabel("time (s)")
        left.set_ylabel("per second")
        left.set_ylim(bottom=0)
        tl = r.get("rss_timeline_mb", [])
        right.plot([t for t, _ in tl], [v for _, v in tl], "-")
        right.set_xlabel("time (s)")
        right.set_ylabel("server RSS, all processes (MB)")
        right.set_ylim(bottom=0)
        title = f"hsmscep-{data['scenario']} {data['mode']}, {data['started_utc']}"
    left.legend(fontsize=8)
    if data["mode"] == "compare":
        right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
