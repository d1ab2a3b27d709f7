"""Logging set-up, the same in the CLI and in every server worker process.

uvicorn starts its worker processes with `spawn`: they run none of the CLI's set-up, so
without this the audit lines and warnings of every worker but a lone one would be lost.
`dict_config` is the whole set-up as plain data, so that uvicorn applies it in each worker
before its first line; `configure` applies it here. Every logger (hsmscep, uvicorn, asyncio,
warnings) goes through the one stderr handler, as text or one JSON object per line, each line
tagged with the request id of the request it belongs to (`current_request`, a contextvar the
web layer sets per request and the signing pool carries into its worker threads).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(request_tag)s%(name)s %(message)s"
_HANDLER = "hsmscep-stderr"  # the name of the one handler configure() installs


class RequestInfo:
    """What the log lines of one request share: its id, and its SCEP message type once known."""

    __slots__ = ("id", "message_type")

    def __init__(self, request_id: str) -> None:
        self.id = request_id
        self.message_type: str | None = None


current_request: ContextVar[RequestInfo | None] = ContextVar("hsmscep_request", default=None)


class RequestFilter(logging.Filter):
    """Tags each record with the request it was logged in (`request_id`, `request_tag`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = current_request.get()
        record.request_id = info.id if info is not None else None
        record.request_tag = f"[{info.id}] " if info is not None else ""
        # The audit line knows the pkiMessage type, the access line after it reports it.
        data = getattr(record, "data", None)
        if info is not None and info.message_type is None and isinstance(data, dict):
            kind = data.get("message_type")
            info.message_type = None if kind is None else str(kind)
        return True


# One encoder for every line: json.dumps() with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601 UTC), level, logger, message, pid, and the
    request id, the record's `data` and the exception text when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            entry["data"] = data
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _ENCODER.encode(entry)


def make_handler(fmt: str = "text") -> logging.Handler:
    """The one stderr handler, as `fmt` ("text" or "json"), tagging request ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))
    handler.addFilter(RequestFilter())
    handler.set_name(_HANDLER)
    return handler


def dict_config(
    level: str = "INFO", fmt: str = "text", levels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """`configure` as logging.config.dictConfig data (picklable: uvicorn's `log_config`,
    applied in each worker process before its first line)."""
    root, named = _levels(level, levels)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        # dictConfig names the handler by its key: configure() then knows it as its own.
        "handlers": {_HANDLER: {"()": f"{__name__}.make_handler", "fmt": fmt}},
        "root": {"level": root, "handlers": [_HANDLER]},
        "loggers": {name: {"level": value} for name, value in named.items()},
    }


def configure(
    level: str | int = logging.INFO, fmt: str = "text", levels: Mapping[str, str] | None = None
) -> None:
    """Log every logger to stderr as `fmt` ("text" or "json"): hsmscep and uvicorn at
    `level`, other libraries at INFO, then `levels` (logger name -> level; "root": the root
    logger). Replaces only the handler an earlier call installed (pytest's stay)."""
    root, named = _levels(logging.getLevelName(level) if isinstance(level, int) else level, levels)
    top = logging.getLogger()
    for handler in [h for h in top.handlers if h.get_name() == _HANDLER]:
        top.removeHandler(handler)
    top.addHandler(make_handler(fmt))
    top.setLevel(root)
    for name, value in named.items():
        logging.getLogger(name).setLevel(value)
    logging.captureWarnings(True)
    if fmt == "json":
        # Uncaught exceptions too: a traceback on stderr would be the one line not JSON.
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_exception


def _levels(level: str, levels: Mapping[str, str] | None) -> tuple[str, dict[str, str]]:
    named = {"hsmscep": level, "uvicorn": level, **(levels or {})}
    return named.pop("root", "INFO"), named


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("hsmscep").critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
    log = logging.getLogger("hsmscep")
    log.critical("uncaught exception in thread %s", name, exc_info=exc_info)


class Throttled:
    """At most one line per `interval` seconds per key; the next line counts what was held
    back. For faults that repeat on every request (a full disk answered 37,704 lines in 75 s)."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger, self._interval = logger, interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log `msg % args` unless `key` was logged less than `interval` ago; True if logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            msg += " (%d more like it in the last %.0f s)"
            args = (*args, held, self._interval if last is None else now - last)
        self._logger.log(level, msg, *args)
        return True
