"""[log]: hsmscep's level, text or JSON lines, the access log and levels per logger.

Part of the sections (hsmscep.config.sections re-exports it), in a module of its own for its
validation of logger names and the HSMSCEP_LOG_LEVELS spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from hsmscep.config.reader import Reader, did_you_mean
from hsmscep.errors import ConfigError


@dataclass(frozen=True, slots=True)
class LogSettings:
    """[log]: hsmscep's level, text or JSON lines, the access log, levels per logger."""

    KEYS: ClassVar[frozenset[str]] = frozenset({"level", "format", "access", "levels"})
    LEVELS: ClassVar[tuple[str, ...]] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    FORMATS: ClassVar[tuple[str, ...]] = ("text", "json")

    level: str = "INFO"
    format: str = "text"
    access: bool = True  # one line per HTTP request (hsmscep.access, INFO)
    levels: tuple[tuple[str, str], ...] = ()  # [log.levels]: logger name -> level

    @classmethod
    def read(cls, r: Reader) -> LogSettings:
        fmt = str(r.get("log", "format", "text")).lower()
        if fmt not in cls.FORMATS:
            raise ConfigError(
                f"log.format has value {fmt!r}; use text or json"
                + did_you_mean(fmt, cls.FORMATS, "{}")
            )
        return cls(
            level=cls._level("log.level", r.get("log", "level", "INFO")),
            format=fmt,
            access=r.boolean("log", "access", True),
            levels=cls._levels(r.get("log", "levels", {})),
        )

    @classmethod
    def _levels(cls, raw: object) -> tuple[tuple[str, str], ...]:
        # From the file a [log.levels] table; from HSMSCEP_LOG_LEVELS "name=LEVEL,name=LEVEL".
        if isinstance(raw, str):
            pairs: list[tuple[object, object]] = []
            for item in filter(None, (part.strip() for part in raw.split(","))):
                key, sep, value = item.partition("=")
                if not sep:
                    raise ConfigError(
                        f"HSMSCEP_LOG_LEVELS: {item!r} is not logger=LEVEL"
                        " (e.g. hsmscep.audit=INFO,uvicorn=WARNING)"
                    )
                pairs.append((key.strip(), value.strip()))
        elif isinstance(raw, dict):
            pairs = list(raw.items())
        else:
            raise ConfigError('log.levels must be a table such as [log.levels] uvicorn = "WARNING"')
        out = []
        for name, given in pairs:
            if not isinstance(name, str) or not LOGGER_NAME.fullmatch(name):
                raise ConfigError(
                    f"log.levels: {name!r} is not a logger name (letters, digits, '_', '-',"
                    ' dots between; "root" for the root logger)'
                )
            out.append((name, cls._level(f"log.levels.{name}", given)))
        return tuple(out)

    @classmethod
    def _level(cls, key: str, value: object) -> str:
        level = str(value).upper()
        if level not in cls.LEVELS:
            raise ConfigError(
                f"{key} has value {value!r}; use one of {', '.join(cls.LEVELS)}"
                + did_you_mean(level, cls.LEVELS, "{}")
            )
        return level


LOGGER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*")
