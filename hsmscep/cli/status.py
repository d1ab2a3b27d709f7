"""`hsmscep status`: the start-up banner's facts plus counts from each CA's store, as text,
JSON (`--json`) and a plot of issuance per hour (`--plot`).

It reads: the configuration, the certificate files, and the stores opened read-only
(store/readonly.py), so it runs beside live servers and never touches the HSM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from hsmscep.cli import statusplot
from hsmscep.cli.banner import Facts, StoreFacts, certificate_paths, gather, load_certificates
from hsmscep.cli.banner import render as render_banner
from hsmscep.cli.preflight import check_certificate_file
from hsmscep.config.settings import Settings, load_settings
from hsmscep.errors import ConfigError
from hsmscep.policy.profiles import DEFAULT_CA
from hsmscep.store.readonly import NoStore, read_stats
from hsmscep.store.records import StoreStats
from hsmscep.store.stats import MAX_DAYS
from hsmscep.web.affinity import usable_cpus

Report = list[tuple[StoreFacts, StoreStats | None]]  # None: no database yet


def run(args: argparse.Namespace) -> int:
    """`hsmscep status`: exit 0 with the report; 1 if --plot cannot be drawn (no matplotlib)."""
    days: int = args.days
    if not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"--days must be between 1 and {MAX_DAYS}, not {days}")
    plot: Path | None = args.plot
    plt = None
    if plot is not None:
        statusplot.check_target(plot)
        plt = statusplot.pyplot()
        if plt is None:
            print(f"hsmscep: {statusplot.INSTALL_HINT}", file=sys.stderr)
            return 1
    settings = load_settings(args.config)
    now = datetime.now(UTC)
    facts = gather(settings, _certificates(settings), cpus=len(usable_cpus()), now=now)
    report = asyncio.run(_read(settings, facts, now, days))
    if args.json:
        print(json.dumps(as_json(facts, report, days), indent=2))
    else:
        for line in text(facts, report, days):
            print(line)
    if plt is not None and plot is not None:
        hourly = {s.ca: stats.hourly for s, stats in report if stats is not None}
        statusplot.draw(plt, plot, hourly, days)
        print(f"plot written to {plot}", file=sys.stderr)
    return 0


def _certificates(settings: Settings) -> dict[Path, x509.Certificate]:
    for ca, role, path in certificate_paths(settings):
        check_certificate_file(f"{role} certificate of CA {ca}", path)
    return load_certificates(settings)


async def _read(settings: Settings, facts: Facts, now: datetime, days: int) -> Report:
    report: Report = []
    extra = {ca.name: ca.db_path for ca in settings.cas}
    for store in facts.stores:
        # The facts' location is for display; connect with the configured one.
        location = settings.store.location if store.ca == DEFAULT_CA else extra[store.ca]
        try:
            stats = await read_stats(location, password=settings.store.password, now=now, days=days)
        except NoStore:
            stats = None
        report.append((store, stats))
    return report


def text(facts: Facts, report: Report, days: int) -> list[str]:
    """The report for people: the banner (problems marked), then each store's counts."""
    marks = {logging.WARNING: "WARNING: ", logging.ERROR: "ERROR: "}
    lines = [marks.get(level, "") + line for level, line in render_banner(facts)]
    for store, stats in report:
        lines.append(f"store ({store.ca}):")
        if stats is None:
            lines.append("  no database yet: the server creates it when it first starts")
            continue
        lines.append(
            f"  certificates: {stats.total} issued, {stats.issued_today} today (UTC),"
            f" {stats.revoked} revoked"
        )
        lines.append(f"  requests pending approval: {stats.pending}")
        lines.append(f"  one-time challenges outstanding: {stats.challenges_outstanding}")
        lines.append("  " + _crl_line(stats, facts.now))
        in_window = sum(count for _, count in stats.hourly)
        peak_hour, peak = max(stats.hourly, key=lambda item: item[1])
        busiest = f", busiest hour {peak_hour:%Y-%m-%d %H}:00Z with {peak}" if peak else ""
        lines.append(f"  issued in the last {days} days: {in_window}{busiest}")
    return lines


def _crl_line(stats: StoreStats, now: datetime) -> str:
    crl = stats.crl
    if crl is None:
        return "CRL: none published yet (the server signs the first one when it starts)"
    left = (crl.next_update - now).total_seconds() / 3600
    state = f"in {left:.1f} h" if left > 0 else f"OVERDUE by {-left:.1f} h"
    return (
        f"CRL: number {crl.number}, {crl.revision} revocations, thisUpdate"
        f" {crl.this_update:%Y-%m-%d %H:%M}Z, nextUpdate {crl.next_update:%Y-%m-%d %H:%M}Z"
        f" ({state})"
    )


def as_json(facts: Facts, report: Report, days: int) -> dict[str, Any]:
    """The report for machines: every fact, times in ISO 8601 UTC, problems as a list."""
    body: dict[str, Any] = _plain(asdict(facts))
    body["problems"] = [
        {"level": logging.getLevelName(level).lower(), "message": line}
        for level, line in render_banner(facts)
        if level >= logging.WARNING
    ]
    body["days"] = days
    body["stores"] = [
        _plain(asdict(store)) | {"stats": None if stats is None else _plain(asdict(stats))}
        for store, stats in report
    ]
    for entry in body["stores"]:
        if entry["stats"] is not None:
            entry["stats"]["hourly"] = [
                {"hour": hour, "issued": count} for hour, count in entry["stats"]["hourly"]
            ]
    return body


def _plain(value: Any) -> Any:
    """JSON-ready: datetimes as ISO 8601, paths as text, tuples as lists."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value
