"""Reading [<profile>.webhook] and [<profile>.notify] tables into WebhookConfig.

The wire format and its settings are documented in hsmscep.policy.webhook.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hsmscep.config.reader import did_you_mean
from hsmscep.errors import ConfigError
from hsmscep.policy.webhook import DEFAULT_TIMEOUT, WebhookConfig

MIN_SECRET_BYTES = 16
MAX_TIMEOUT = 60.0
_COMMON_KEYS = frozenset({"url", "secret_env", "secret_file", "timeout_seconds", "ca_file"})


def parse_webhook(
    table: Mapping[str, Any], where: str, base: Path, env: Mapping[str, str]
) -> WebhookConfig:
    """Read an authorization webhook table (e.g. where="profiles.wifi.webhook")."""
    return _parse(table, where, base, env, _COMMON_KEYS | {"on_error"})


def parse_notify(
    table: Mapping[str, Any], where: str, base: Path, env: Mapping[str, str]
) -> WebhookConfig:
    """Read a notification webhook table (e.g. where="profiles.wifi.notify"); no on_error."""
    return _parse(table, where, base, env, _COMMON_KEYS)


def _parse(
    table: Mapping[str, Any],
    where: str,
    base: Path,
    env: Mapping[str, str],
    known: frozenset[str],
) -> WebhookConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{where}] must be a table")
    if "secret" in table:
        raise ConfigError(
            f"{where}.secret must not be written in the config file; "
            f"use {where}.secret_env or {where}.secret_file"
        )
    for key in table:
        if key not in known:
            raise ConfigError(
                f"{where}.{key} is not a known key ({', '.join(sorted(known))})"
                + did_you_mean(key, known, f"{where}.{{}}")
            )
    url = _url(table.get("url"), f"{where}.url")
    secret = _secret(table, where, base, env)
    timeout = _timeout(table.get("timeout_seconds", DEFAULT_TIMEOUT), f"{where}.timeout_seconds")
    on_error = table.get("on_error", "deny")
    if on_error not in ("deny", "allow"):
        raise ConfigError(f"{where}.on_error must be deny or allow, not {on_error!r}")
    ca_file = _ca_file(table.get("ca_file"), f"{where}.ca_file", base, url)
    return WebhookConfig(url, secret, timeout, "allow" if on_error == "allow" else "deny", ca_file)


def _url(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} is required: an http:// or https:// URL")
    try:
        parsed = urlsplit(value)
        port = parsed.port
    except ValueError as exc:
        if "Port" in str(exc):
            raise ConfigError(f"{key} has an invalid port") from None
        raise ConfigError(f"{key} is not a valid URL: {exc}") from None
    if "@" in parsed.netloc:
        # It would end up in logs; the HMAC signature is what authenticates us.
        raise ConfigError(f"{key} must not carry a user name or password")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{key} must be an http:// or https:// URL with a host, not {value!r}")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"{key} has an invalid port {port}")
    return value


def _secret(table: Mapping[str, Any], where: str, base: Path, env: Mapping[str, str]) -> bytes:
    env_name, file_name = table.get("secret_env"), table.get("secret_file")
    if env_name is None and file_name is None:
        raise ConfigError(f"{where}.secret_env or {where}.secret_file is required")
    if env_name is not None and file_name is not None:
        raise ConfigError(f"{where}: set only one of secret_env and secret_file")
    if env_name is not None:
        key = f"{where}.secret_env"
        if not isinstance(env_name, str) or not env_name:
            raise ConfigError(f"{key} must be the name of an environment variable")
        if env_name not in env:
            raise ConfigError(f"{key}: environment variable {env_name} is not set")
        secret = env[env_name].encode()
    else:
        key = f"{where}.secret_file"
        if not isinstance(file_name, str) or not file_name:
            raise ConfigError(f"{key} must be a file name")
        path = (base / file_name).resolve()
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"{key}: the secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def _timeout(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number of seconds, not {value!r}")
    if not 0 < value <= MAX_TIMEOUT:  # also refuses nan
        raise ConfigError(f"{key} must be more than 0 and at most {MAX_TIMEOUT:g}, got {value!r}")
    return float(value)


def _ca_file(value: Any, key: str, base: Path, url: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a file name")
    if urlsplit(url).scheme != "https":
        raise ConfigError(f"{key} applies to https:// URLs only")
    path = (base / value).resolve()
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except OSError as exc:  # ssl.SSLError included: not PEM, no certificate in it
        raise ConfigError(f"{key}: cannot load CA certificates from {path}: {exc}") from None
    return path
