"""Compare hsmscep series of one run (variants, repeated rounds): per-level ratios, table, plot.

The baseline of a CA scenario is the hsmscep of the driver's own tree. Every other hsmscep
series is set against it per concurrency level, by the ratio of the medians over the rounds
and by the ratio within each round (the two ran back to back there, so drift cancels).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    """Per level and series: the rounds' numbers, their medians, and ratios to the baseline."""
    hsmscep = {lb: s for lb, s in data["series"].items() if s["server"] == "hsmscep"}
    # The driver's own tree per scenario, on an empty SQLite store (the PostgreSQL and pre-filled
    # series are set against it too); without one (--servers scepserver), the first variant.
    baselines: dict[str, str] = {}
    for label, s in hsmscep.items():
        if not s.get("variant") and s.get("store", "sqlite") == "sqlite" and not s.get("prefill"):
            baselines[s["scenario"]] = label
    for label, s in hsmscep.items():
        baselines.setdefault(s["scenario"], label)
    levels: dict[str, dict[str, Any]] = {}
    for users in data["levels"]:
        row: dict[str, Any] = {}
        for label, s in hsmscep.items():
            row[label] = _runs(s["levels"], users)
        for label, s in hsmscep.items():
            base = baselines[s["scenario"]]
            if label != base:
                row[label]["vs_baseline"] = _ratios(row[label], row[base])
        levels[str(users)] = row
    return {"baseline": baselines, "levels": levels}


def paired_ratios(
    phases: list[dict[str, Any]], base_phases: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per concurrency, each round's rate over the base's in the same round, and their median
    (for series that are not variants, e.g. a store against another)."""
    out: dict[str, dict[str, Any]] = {}
    for users in sorted({p["users"] for p in phases}):
        ratios = _ratios(_runs(phases, users), _runs(base_phases, users))
        per_round = ratios["paired_enrollments_per_s"]
        known = [r for r in per_round if r is not None]
        if known:
            out[str(users)] = {"median": round(statistics.median(known), 3), "per_round": per_round}
    return out


def _runs(phases: list[dict[str, Any]], users: int) -> dict[str, Any]:
    runs = sorted((p for p in phases if p["users"] == users), key=lambda p: p.get("round", 0))
    rates = [p["enrollments_per_s"] for p in runs]
    p99 = [p["latency_ms"]["p99"] for p in runs]
    p50 = [p["latency_ms"]["p50"] for p in runs]
    return {
        "rounds": [p.get("round", 0) for p in runs],
        "enrollments_per_s": rates,
        "p50_ms": p50,
        "p99_ms": p99,
        "median_enrollments_per_s": _median(rates),
        "median_p50_ms": _median(p50),
        "median_p99_ms": _median(p99),
        # (max - min) / median over the rounds: how much this series moved within the run.
        "spread_enrollments_per_s": _spread(rates),
        "spread_p99_ms": _spread(p99),
        "errors": sum(p["errors"] for p in runs),
        "http_503": sum(p["http_503"] for p in runs),
        "other_cpu_cores": [
            round(p["other_cpu_s"] / p["wall_s"], 2) if p["wall_s"] else None for p in runs
        ],
        "loadavg_before": [p.get("loadavg_before") for p in runs],
    }


def _ratios(series: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    paired_rate, paired_p99 = [], []
    for i, rnd in enumerate(series["rounds"]):
        if rnd in base["rounds"]:
            j = base["rounds"].index(rnd)
            paired_rate.append(_div(series["enrollments_per_s"][i], base["enrollments_per_s"][j]))
            paired_p99.append(_div(series["p99_ms"][i], base["p99_ms"][j]))
    return {
        "enrollments_per_s": _div(
            series["median_enrollments_per_s"], base["median_enrollments_per_s"]
        ),
        "p99_ms": _div(series["median_p99_ms"], base["median_p99_ms"]),
        "p50_ms": _div(series["median_p50_ms"], base["median_p50_ms"]),
        "paired_enrollments_per_s": paired_rate,
        "paired_p99_ms": paired_p99,
    }


def _median(values: list[Any]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None


def _spread(values: list[Any]) -> float | None:
    known = [v for v in values if v is not None]
    mid = statistics.median(known) if known else 0
    return round((max(known) - min(known)) / mid, 3) if mid else None


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def table(data: dict[str, Any]) -> str:
    """The rounds and ratios as text, one line per level and series."""
    summary = data["summary"]["variants"]
    built = [
        f"{name}={v['commit'][:10]}" + (f"+{v['patch']}" if v["patch"] else "")
        for name, v in data["variants"].items()
    ]
    lines = ["", f"variants: {', '.join(built) or 'none'}"]
    for sc, base in summary["baseline"].items():
        lines.append(f"baseline {sc}: {base}")
    for users, row in summary["levels"].items():
        for label, e in row.items():
            runs = "/".join(_fmt(v, ".0f") for v in e["enrollments_per_s"])
            p99 = "/".join(_fmt(v, ".0f") for v in e["p99_ms"])
            line = (
                f"  c={users:<4} {label:<28} enroll/s {runs} (median "
                f"{_fmt(e['median_enrollments_per_s'], '.1f')}), p99 ms {p99} (median "
                f"{_fmt(e['median_p99_ms'], '.1f')}), errors {e['errors']}"
            )
            ratio = e.get("vs_baseline")
            if ratio:
                paired = "/".join(_fmt(v, ".2f") for v in ratio["paired_enrollments_per_s"])
                paired_p99 = "/".join(_fmt(v, ".2f") for v in ratio["paired_p99_ms"])
                line += (
                    f"\n{'':9}vs baseline: enroll/s x{_fmt(ratio['enrollments_per_s'], '.3f')}"
                    f" (per round {paired}), p99 x{_fmt(ratio['p99_ms'], '.3f')}"
                    f" (per round {paired_p99})"
                )
            lines.append(line)
    return "\n".join(lines)


def _fmt(v: float | None, spec: str) -> str:
    return format(v, spec) if v is not None else "-"


def plot(data: dict[str, Any], path: Path) -> Path | None:
    """Per level: every round's enrollments/s and p99 per series, and the ratios to baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    summary = data["summary"]["variants"]
    labels = list(data["series"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / max(1, len(labels))
    for li, row in enumerate(summary["levels"].values()):
        for si, label in enumerate(labels):
            e = row.get(label)
            if e is None:
                continue
            x = li + (si - (len(labels) - 1) / 2) * width
            color = f"C{si}"
            first = li == 0
            for ax, key in ((axes[0], "enrollments_per_s"), (axes[1], "p99_ms")):
                ys = [v for v in e[key] if v is not None]
                ax.scatter([x] * len(ys), ys, color=color, s=18, label=label if first else None)
                med = e[f"median_{key}"]
                if med is not None:
                    ax.hlines(med, x - width / 2, x + width / 2, color=color)
            ratio = e.get("vs_baseline")
            if ratio:
                for k, (key, hatch) in enumerate((("enrollments_per_s", ""), ("p99_ms", "//"))):
                    if ratio[key] is None:
                        continue
                    name = "enroll/s" if key == "enrollments_per_s" else "p99"
                    axes[2].bar(
                        x + (k - 0.5) * width / 2,
                        ratio[key],
                        width / 2,
                        color=color,
                        hatch=hatch,
                        alpha=0.7,
                        label=f"{label} {name}" if first else None,
                    )
                    paired = [v for v in ratio[f"paired_{key}"] if v is not None]
                    axes[2].scatter(
                        [x + (k - 0.5) * width / 2] * len(paired), paired, color="k", s=8
                    )
    ticks = list(range(len(summary["levels"])))
    names = [f"c={u}" for u in summary["levels"]]
    titles = (
        "verified enrollments/s (dots: rounds, line: median)",
        "p99 latency (ms)",
        "median ratio to baseline (dots: per round)",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(ticks, names)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    axes[2].axhline(1.0, color="grey", linestyle=":")
    fig.suptitle(
        f"hsmscep variants, {data['repeat']} round(s), {data['host']['cpus']} CPUs, "
        f"{data['started_utc']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
