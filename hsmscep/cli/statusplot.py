"""The picture `hsmscep status --plot` draws: certificates issued per hour, one line per CA.

matplotlib is an optional dependency (the bench extras): imported only here, only when a plot
is asked for, and checked before anything else runs so that a missing one costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from hsmscep.errors import ConfigError

FORMATS = (".png", ".svg")
INSTALL_HINT = (
    "--plot needs matplotlib, which is in hsmscep's bench extras: install them with"
    " `pip install --require-hashes -r requirements/bench.txt` (or `pip install"
    " 'hsmscep[bench]'`)"
)


def check_target(path: Path) -> None:
    """ConfigError unless `path` names a PNG or SVG file in an existing directory."""
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"--plot {path}: the file name must end in .png or .svg")
    if not path.parent.is_dir():
        raise ConfigError(f"--plot {path}: directory {path.parent} does not exist")


def pyplot() -> Any | None:
    """matplotlib.pyplot on a file-only backend, or None if matplotlib is not installed."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display: draw into files only
    return importlib.import_module("matplotlib.pyplot")


def draw(
    plt: Any, path: Path, series: Mapping[str, Sequence[tuple[datetime, int]]], days: int
) -> None:
    """Write the issuance of each CA in `series` (hour start -> count) to `path`."""
    figure, axes = plt.subplots(figsize=(10, 3.5), layout="constrained")
    try:
        for ca, hourly in series.items():
            if not hourly:
                continue
            # Each count covers its hour: the last one needs its end drawn too.
            hours = [hour for hour, _ in hourly] + [hourly[-1][0] + timedelta(hours=1)]
            counts = [count for _, count in hourly] + [hourly[-1][1]]
            axes.step(hours, counts, where="post", label=f"CA {ca}")
        axes.set_title(f"Certificates issued per hour, last {days} day{'s' if days > 1 else ''}")
        axes.set_ylabel("certificates / hour")
        axes.set_xlabel("hour (UTC)")
        axes.set_ylim(bottom=0)
        axes.yaxis.get_major_locator().set_params(integer=True)
        axes.grid(True, alpha=0.3)
        if len(series) > 1:
            axes.legend()
        figure.savefig(path, format=path.suffix.lower().lstrip("."))
    finally:
        plt.close(figure)
