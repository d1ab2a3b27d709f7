"""[metrics]: where the Prometheus endpoint answers, who may read it, and where the worker
processes keep their counts.

Part of the sections (hsmscep.config.sections re-exports it), in a module of its own to keep
sections.py a readable size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from hsmscep.config.reader import Reader
from hsmscep.errors import ConfigError


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """[metrics]: the Prometheus endpoint (docs/operations.md#metrics)."""

    KEYS: ClassVar[frozenset[str]] = frozenset(
        {"enabled", "path", "require_admin_token", "listen", "directory"}
    )

    enabled: bool = True
    path: str = "/metrics"
    require_admin_token: bool = False  # the admin API's bearer token, 401/404 as it answers
    listen: tuple[str, int] | None = None  # served by the supervisor instead of the SCEP port
    directory: Path | None = None  # multiprocess files; None: a private temporary directory

    @classmethod
    def read(cls, r: Reader, admin_token: str | None) -> MetricsSettings:
        path = r.text("metrics", "path", "/metrics") or "/metrics"
        if not path.startswith("/") or path.rstrip("/") in ("", "/scep", "/admin"):
            raise ConfigError(f"metrics.path must be a path of its own like /metrics, not {path!r}")
        require = r.boolean("metrics", "require_admin_token", False)
        if require and admin_token is None:
            raise ConfigError("metrics.require_admin_token needs an admin token ([admin])")
        listen = r.text("metrics", "listen")
        return cls(
            enabled=r.boolean("metrics", "enabled", True),
            path=path,
            require_admin_token=require,
            listen=None if listen is None else parse_listen(listen),
            directory=r.file("metrics", "directory"),
        )


def parse_listen(value: str) -> tuple[str, int]:
    """ "127.0.0.1:9102" or "[::1]:9102" as (host, port)."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics.listen must be HOST:PORT (e.g. 127.0.0.1:9102), not {value!r}")
    return host, int(port)
