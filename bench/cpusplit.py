"""Server CPU per enrollment, split into the HSM's private-key calls and everything else.

The driver measures all server processes' CPU (utime + stime from /proc) per verified
enrollment. SoftHSM2 runs inside those processes, so part of it is the token's: the ceiling
measures each private-key operation's thread CPU time alone on the same token and keys, and
an enrollment makes one of each (RA decrypt, RA sign, CA sign). The rest is the server's own
work (HTTP, parsing, CMS, the pool hand-off, the store, logging): what a fast network HSM
leaves as the ceiling. Under load the token's calls cost somewhat more than alone (cold
caches, preemption), so the part outside is an upper bound; `bench.inprocess_cpu` measures
the calls' thread CPU inside the server instead.
"""

from __future__ import annotations

from typing import Any


def annotate(result: dict[str, Any]) -> None:
    """Add `hsm_cpu_ms_per_enrollment` and `cpu_ms_outside_hsm_per_enrollment` to every
    hsmscep level of a compare result whose scenario has a ceiling."""
    ceilings = result.get("ceiling", {})
    for series in result.get("series", {}).values():
        if series.get("server") != "hsmscep":
            continue
        hsm_ms = ceilings.get(series.get("scenario"), {}).get("hsm_cpu_ms_per_enrollment")
        if not hsm_ms:
            continue
        for level in series["levels"]:
            total = level.get("cpu_ms_per_enrollment")
            level["hsm_cpu_ms_per_enrollment"] = round(hsm_ms, 3)
            level["cpu_ms_outside_hsm_per_enrollment"] = (
                round(total - hsm_ms, 3) if total is not None else None
            )
