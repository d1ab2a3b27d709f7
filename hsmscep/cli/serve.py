"""`hsmscep serve`: pre-flight, then uvicorn with one HSM pool per worker process.

Flags override the config file by setting the matching HSMSCEP_SERVER_* variables, so
uvicorn's spawned worker processes see the same settings. Any worker count runs under the
same supervisor, so that failures and SIGHUP behave alike with 1 and with N workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hsmscep import logs
from hsmscep.cli.banner import log_banner
from hsmscep.cli.preflight import preflight
from hsmscep.config.settings import Settings, load_settings
from hsmscep.errors import ConfigError, HsmError, StoreError, WorkerStartFailed

log = logging.getLogger(__name__)


def apply_overrides(args: argparse.Namespace) -> None:
    """Command-line flags as HSMSCEP_SERVER_* variables (spawned workers inherit them)."""
    for flag, key in (
        ("host", "HOST"),
        ("port", "PORT"),
        ("workers", "WORKERS"),
        ("pool_size", "POOL_SIZE"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[f"HSMSCEP_SERVER_{key}"] = str(value)


def run(args: argparse.Namespace) -> int:
    """`hsmscep serve`."""
    apply_overrides(args)
    config = str(Path(args.config).resolve())
    settings = load_settings(config)
    return run_server(config, settings)


_APP = "hsmscep.web.app:app_from_env"


def run_server(config: str, settings: Settings) -> int:
    """Pre-flight, then `settings.server.workers` processes, each opening its own HSM pool."""
    import uvicorn

    from hsmscep.hsm.login import check_logins
    from hsmscep.web import affinity, balance, scrape
    from hsmscep.web.httpproto import (
        BoundedHttpToolsProtocol,
        connection_cap,
        raise_open_files_limit,
    )
    from hsmscep.web.lifespan import settings_tokens

    logs.configure(settings.log.level, settings.log.format, dict(settings.log.levels))
    # Until the supervisor takes SIGHUP over, it must not kill the server (nor, inherited as
    # "ignored", the workers: they leave SIGHUP to the supervisor).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    preflight(settings)
    log.info("pre-flight passed: configuration, files, store, tokens and keys, port")
    os.environ["HSMSCEP_CONFIG"] = config
    logs.configure(settings.log.level, settings.log.format, dict(settings.log.levels))
    # One login per token before any worker process exists: a refused PIN stops here, after
    # one C_Login, instead of once per worker and restart (network HSMs lock the role).
    check_logins(settings_tokens(settings), settings.pkcs11.replicas)
    cpus = affinity.usable_cpus()
    workers = affinity.worker_processes(settings.server.workers)
    log_banner(settings, cpus=len(cpus), now=datetime.now(UTC))
    # Before the workers start: they inherit the limit, and each derives its cap from it.
    before, after = raise_open_files_limit()
    logging.getLogger("hsmscep.web").info(
        "open files limit %d (soft limit was %d): at most %d connections per worker process",
        after,
        before,
        connection_cap(),
    )
    options: dict[str, Any] = {
        "factory": True,
        "host": settings.server.host,
        "port": settings.server.port,
        "loop": "uvloop",
        "http": BoundedHttpToolsProtocol,
        # hsmscep.access writes the access log (web/requestlog.py); every process, the
        # workers from their first line, logs through hsmscep.logs' handler.
        "access_log": False,
        "log_config": logs.dict_config(
            settings.log.level, settings.log.format, dict(settings.log.levels)
        ),
        "backlog": 4096,
        "timeout_keep_alive": 15,
        "timeout_graceful_shutdown": 30,
    }
    if affinity.should_pin(settings.server.pin_cpus, workers, len(cpus)):
        os.environ[affinity.ENV] = ",".join(map(str, cpus))
    # One HSM session per process: connections must be spread by load, which uvicorn's
    # shared accept does not do (web/balance.py). One worker runs supervised too: SIGHUP
    # then restarts it gracefully, as it does N workers, instead of killing the server.
    # Before any worker is spawned: prometheus-client reads its directory once, at import.
    with (
        scrape.process_directory(settings.metrics),
        scrape.supervisor_listener(settings.metrics, settings.admin.token),
    ):
        code = balance.serve(uvicorn.Config(_APP, workers=workers, **options), _recheck(config))
    if code:
        raise WorkerStartFailed("a worker process failed to start; its log is above")
    return 0


def _recheck(config: str) -> Callable[[], bool]:
    """SIGHUP's guard: the configuration and what it names must pass pre-flight again."""

    def check() -> bool:
        try:
            preflight(load_settings(config), listen=False)
        except (ConfigError, HsmError, StoreError) as exc:
            log.error("SIGHUP: not restarting the workers, the configuration fails: %s", exc)
            return False
        log.info("SIGHUP: configuration checked; restarting the workers one by one")
        return True

    return check
