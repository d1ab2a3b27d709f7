"""bench/cpusplit.py: the bench JSON's split of server CPU per enrollment into the HSM calls
(the ceiling's thread CPU per operation) and the server's own part."""

from __future__ import annotations

from typing import Any

from bench import cpusplit


def _result() -> dict[str, Any]:
    return {
        "ceiling": {"rsa2048": {"hsm_cpu_ms_per_enrollment": 1.6}},
        "series": {
            "h": {
                "server": "hsmscep",
                "scenario": "rsa2048",
                "levels": [{"cpu_ms_per_enrollment": 2.3}, {"cpu_ms_per_enrollment": None}],
            },
            "hp": {  # no ceiling for this scenario: left alone
                "server": "hsmscep",
                "scenario": "p256",
                "levels": [{"cpu_ms_per_enrollment": 2.0}],
            },
            "s": {
                "server": "scepserver",
                "scenario": "rsa2048",
                "levels": [{"cpu_ms_per_enrollment": 5.0}],
            },
        },
    }


def test_levels_get_the_hsm_part_and_the_rest() -> None:
    data = _result()
    cpusplit.annotate(data)
    first, idle = data["series"]["h"]["levels"]
    assert first["hsm_cpu_ms_per_enrollment"] == 1.6
    assert first["cpu_ms_outside_hsm_per_enrollment"] == 0.7
    # A level without enrollments has no CPU per enrollment, so no part outside either.
    assert idle["cpu_ms_outside_hsm_per_enrollment"] is None
    assert "hsm_cpu_ms_per_enrollment" not in data["series"]["hp"]["levels"][0]
    # scepserver has no HSM of ours: its CPU is not split.
    assert "cpu_ms_outside_hsm_per_enrollment" not in data["series"]["s"]["levels"][0]
