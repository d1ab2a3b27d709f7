"""Serving the metrics: GET /metrics in a worker, the supervisor's own listener, and the
multiprocess directory prometheus-client keeps its per-process files in.

`serve` owns the directory: a fresh private one (or `[metrics] directory`, emptied) exists
and PROMETHEUS_MULTIPROC_DIR names it before any worker is spawned, since prometheus-client
reads the variable once, at import. A worker that exits is marked dead (its live gauges leave
the sum; its counters stay, so a restart neither loses nor doubles them), and a directory
`serve` created is removed at exit. Without the variable (in-process tests) the process's own
default registry is served.
"""

from __future__ import annotations

import hmac
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from hsmscep.config.sections import MetricsSettings
from hsmscep.errors import ConfigError

log = logging.getLogger(__name__)

DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exposition() -> bytes:
    """Every series of every live and past worker process, in the text format."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess

    path = os.environ.get(DIR_ENV)
    if not path:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def authorized(header: str, token: str) -> bool:
    """Whether an Authorization header carries the bearer `token` (constant time)."""
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics on the SCEP port: 404 when disabled or served on a port of its own."""
    settings: MetricsSettings = request.state.metrics_settings
    if not settings.enabled or settings.listen is not None:
        return PlainTextResponse("not found\n", status_code=404)
    if settings.require_admin_token:
        token: str | None = request.state.admin_token
        if token is None:
            return PlainTextResponse("not found\n", status_code=404)
        if not authorized(request.headers.get("authorization", ""), token):
            return PlainTextResponse(
                "unauthorized\n", status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
    request.state.metrics.flush()  # this process's counts up to now; the others' lag <= 1 s
    return Response(exposition(), media_type=CONTENT_TYPE)


@contextmanager
def process_directory(settings: MetricsSettings) -> Iterator[str | None]:
    """In the supervisor, before any worker: the multiprocess directory, set in the
    environment; removed at exit if made here. None (nothing set) when metrics are off."""
    if not settings.enabled:
        os.environ.pop(DIR_ENV, None)
        yield None
        return
    created = settings.directory is None
    if settings.directory is None:
        path = tempfile.mkdtemp(prefix="hsmscep-metrics-")
    else:
        path = str(settings.directory)
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            for entry in Path(path).glob("*.db"):  # a previous run's values: not this server's
                entry.unlink()
        except OSError as exc:
            raise ConfigError(f"metrics.directory {path}: {exc.strerror or exc}") from None
    os.environ[DIR_ENV] = path
    try:
        yield path
    finally:
        os.environ.pop(DIR_ENV, None)
        if created:
            shutil.rmtree(path, ignore_errors=True)


def process_exited(pid: int | None) -> None:
    """In the supervisor: a worker process is gone; its live gauges leave the sums."""
    path = os.environ.get(DIR_ENV)
    if path and pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def wsgi_app(path: str, token: str | None) -> Callable[..., Iterable[bytes]]:
    """The supervisor's listener: `path` only, with the bearer `token` if given."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != path or environ.get("REQUEST_METHOD") != "GET":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if token is not None and not authorized(environ.get("HTTP_AUTHORIZATION", ""), token):
            headers = [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")]
            start_response("401 Unauthorized", headers)
            return [b"unauthorized\n"]
        body = exposition()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE)])
        return [body]

    return app


@contextmanager
def supervisor_listener(settings: MetricsSettings, admin_token: str | None) -> Iterator[None]:
    """`[metrics] listen`: the supervisor serves the metrics on an address of its own."""
    if not settings.enabled or settings.listen is None:
        yield
        return
    from prometheus_client.exposition import ThreadingWSGIServer

    host, port = settings.listen

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    token = admin_token if settings.require_admin_token else None
    try:
        server = make_server(host, port, wsgi_app(settings.path, token), Server, _QuietHandler)
    except OSError as exc:
        raise ConfigError(f"metrics.listen {host}:{port}: cannot listen there: {exc}") from None
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("metrics on http://%s:%d%s", host, port, settings.path)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
