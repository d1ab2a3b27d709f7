"""`hsmscep config check`: pre-flight without the port, then the effective configuration.

The configuration is printed as `key = value` lines after the file, the HSMSCEP_* overrides
and any rollover are applied. Secrets (PINs, challenges, the admin token, webhook secrets)
are fields with repr=False: they print as `(set)` or `(not set)`, never their value.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography import x509

from hsmscep.cli.preflight import preflight
from hsmscep.config.settings import Settings, load_settings


def run(args: argparse.Namespace) -> int:
    """`hsmscep config check`: exit 0 and print everything, or one line and the class's code."""
    settings = load_settings(args.config)
    print(f"# {settings.config_path}: configuration valid")
    for line in preflight(settings, listen=False):
        print(f"# ok: {line}")
    for line in effective(settings):
        print(line)
    return 0


def effective(settings: Settings) -> list[str]:
    """The effective configuration, one `dotted.key = value` line each, without secrets."""
    return list(_lines("", settings))


def _lines(prefix: str, value: Any) -> Iterator[str]:
    if hasattr(value, "all") and callable(value.all):  # Profiles: one block per profile
        for profile in value.all():
            yield from _lines(f"{prefix}.{profile.name}", profile)
    elif is_dataclass(value) and not isinstance(value, type):
        for field in fields(value):
            name = f"{prefix}.{field.name}" if prefix else field.name
            item = getattr(value, field.name)
            if not field.repr:
                yield f"{name} = {'(not set)' if item in (None, b'', '') else '(set)'}"
            elif field.name != "config_path":
                yield from _lines(name, item)
    elif isinstance(value, tuple | list) and any(is_dataclass(v) for v in value):
        for index, item in enumerate(value):
            yield from _lines(f"{prefix}[{index}]", item)
    else:
        yield f"{prefix} = {_show(value)}"


def _show(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, re.Pattern):
        return repr(value.pattern)
    if isinstance(value, timedelta):
        return str(value)
    if isinstance(value, x509.ExtendedKeyUsage):
        return _show([oid._name for oid in value])
    if isinstance(value, x509.KeyUsage):
        return str(value).removeprefix("<KeyUsage(").removesuffix(")>")
    if isinstance(value, tuple | list | frozenset | set):
        items = sorted(value, key=str) if isinstance(value, frozenset | set) else value
        return "[" + ", ".join(_show(v) for v in items) + "]"
    return repr(value)
