"""The bench summary sets each PostgreSQL series against SQLite and each pre-filled store
against the same backend empty, from one run's phases (bench/report.py)."""

from __future__ import annotations

from typing import Any

from bench import report, variant_report


def _series(store: str, prefill: int, rates: list[float], p99: float = 50.0) -> dict[str, Any]:
    levels = [
        {
            "users": 32,
            "round": n,
            "enrollments_per_s": rate,
            "verified_per_s": rate,
            "cpu_ms_per_enrollment": 2.0,
            "peak_rss_mb": [],
            "errors": 0,
            "scep_failure": 0,
            "duplicate_serials": 0,
            "http_503": 0,
            "latency_ms": {"p50": 20.0, "p99": p99},
            "other_cpu_s": 0.0,
            "wall_s": 5.0,
        }
        for n, rate in enumerate(rates)
    ]
    return {
        "server": "hsmscep",
        "variant": None,
        "scenario": "rsa2048",
        "store": store,
        "prefill": prefill,
        "levels": levels,
    }


def test_ratios_against_sqlite_and_the_empty_store() -> None:
    data = {
        "mode": "compare",
        "levels": [32],
        "ceiling": {},
        "series": {
            "hsmscep-rsa2048": _series("sqlite", 0, [800, 900, 850]),
            "hsmscep-1000000-rsa2048": _series("sqlite", 1_000_000, [820, 810, 830], p99=60.0),
            "hsmscep-pg-rsa2048": _series("postgresql", 0, [780, 760, 770]),
            "hsmscep-pg-1000000-rsa2048": _series("postgresql", 1_000_000, [740, 750, 745]),
        },
    }
    series = report.summarise(data)["series"]
    # Medians over the rounds: 850 SQLite empty, 820 full; 770 PostgreSQL empty, 745 full.
    assert series["hsmscep-pg-rsa2048"]["ratio_vs_sqlite"] == {"32": round(770 / 850, 3)}
    assert series["hsmscep-pg-1000000-rsa2048"]["ratio_vs_sqlite"] == {"32": round(745 / 820, 3)}
    assert series["hsmscep-1000000-rsa2048"]["ratio_vs_empty_store"] == {"32": round(820 / 850, 3)}
    assert series["hsmscep-pg-1000000-rsa2048"]["ratio_vs_empty_store"] == {
        "32": round(745 / 770, 3)
    }
    assert series["hsmscep-1000000-rsa2048"]["p99_ms_full_and_empty_store"] == {"32": [60.0, 50.0]}
    assert "ratio_vs_empty_store" not in series["hsmscep-rsa2048"]
    assert "ratio_vs_sqlite" not in series["hsmscep-1000000-rsa2048"]
    # The per-round comparison is set against the empty SQLite store.
    assert variant_report.summarise(data)["baseline"] == {"rsa2048": "hsmscep-rsa2048"}
