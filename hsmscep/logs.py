"""Logging set-up, the same in the CLI and in every server worker process.

uvicorn starts its worker processes with `spawn`: they run none of the CLI's set-up, so
without this the audit lines and warnings of every worker but a lone one would be lost.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure(level: str | int = logging.INFO) -> None:
    """Log to stderr in FORMAT (once per process), hsmscep's loggers at `level`."""
    logging.basicConfig(level=logging.INFO, format=FORMAT)
    logging.getLogger("hsmscep").setLevel(level)
