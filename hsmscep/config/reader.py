"""The one reader of configuration: TOML tables plus HSMSCEP_<SECTION>_<KEY> overrides, typed.

`Reader` maps a key of a section to its value (the environment wins over the file), checks
its type and resolves paths against the config file's directory; `TableReader` does the same
for a sub-table read strictly as TOML (a template). Every ConfigError names the full key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from hsmscep.errors import ConfigError
from hsmscep.hsm.refs import KeyRef, TokenRef
from hsmscep.policy.profiles import PROFILE_NAME

TOKEN_KEYS = frozenset({"module", "token_label", "token_serial", "pin_env", "pin_file"})


class Reader:
    """Typed access to the sections of one config file and its environment overrides."""

    def __init__(
        self, raw: dict[str, Any], env: Mapping[str, str], path: Path, sections: Collection[str]
    ) -> None:
        self.raw, self.env, self.path, self.base = raw, env, path, path.parent
        self.consulted: set[str] = set()  # the HSMSCEP_* names get() looked at
        for section in raw:
            if section not in sections:
                hint = did_you_mean(section, sections, "[{}]")
                raise ConfigError(f"unknown section [{section}] in {path}{hint}")

    def table(self, section: str) -> dict[str, Any]:
        """The table at a dotted path ("enroll", "profiles.wifi.template"); {} if absent."""
        table: dict[str, Any] = self.raw
        for part in section.split("."):
            value = table.get(part, {})
            if not isinstance(value, dict):
                raise ConfigError(f"[{section}] must be a table")
            table = value
        return table

    def present(self, section: str) -> bool:
        """Whether the file has a non-empty [section]."""
        return bool(self.raw.get(section))

    def get(self, section: str, key: str, default: Any = None) -> Any:
        env_key = env_name(section, key)
        self.consulted.add(env_key)
        if env_key in self.env:
            return self.env[env_key]
        return self.table(section).get(key, default)

    def has(self, section: str, key: str) -> bool:
        """Whether the file (not the environment) sets section.key."""
        return key in self.table(section)

    def integer(self, section: str, key: str, default: int, minimum: int = 0) -> int:
        value = self.get(section, key, default)
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{section}.{key} has value {value!r}; not a valid integer") from None
        if number < minimum:
            raise ConfigError(f"{section}.{key} must be at least {minimum}, got {number}")
        return number

    def boolean(self, section: str, key: str, default: bool) -> bool:
        value = self.get(section, key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{section}.{key} has value {value!r}; not true or false")

    def text(self, section: str, key: str, default: str | None = None) -> str | None:
        value = self.get(section, key, default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{section}.{key} must be a string")
        return value

    def file(self, section: str, key: str, default: str | None = None) -> Path | None:
        value = self.text(section, key, default)
        if value is None:
            return None
        try:
            return (self.base / value).resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python 3.11)
            raise ConfigError(
                f"{section}.{key}: cannot read {self.base / value}: a symbolic link loop"
            ) from None

    def secret(self, section: str, key: str, default_env: str) -> str | None:
        """A secret from `<key>_env` (an env var name) or `<key>_file`; never inline."""
        if key in self.table(section):
            raise ConfigError(
                f"{section}.{key} must not be written in the config file; "
                f"use {section}.{key}_env or {section}.{key}_file"
            )
        file = self.file(section, f"{key}_file")
        if file is not None:
            try:
                return file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{section}.{key}_file: cannot read {file}: {exc}") from None
        env_name = self.text(section, f"{key}_env", default_env)
        return self.env.get(env_name) if env_name else None

    def token(self, section: str, base: TokenRef | None) -> TokenRef:
        """The token of [section]; unset keys (and the PIN, for the same token) from `base`."""
        module = self.text(section, "module", base.module if base else None)
        if not module:
            raise ConfigError(f"{section}.module (path of the PKCS#11 module) is required")
        label = self.text(section, "token_label", base.label if base else None)
        serial = self.text(section, "token_serial", base.serial if base else None)
        if label is None and serial is None:
            raise ConfigError(f"{section}.token_label or {section}.token_serial is required")
        pin = self.secret(section, "pin", "HSMSCEP_PKCS11_PIN")
        if pin is None:
            if base is not None and (module, label, serial) == (
                base.module,
                base.label,
                base.serial,
            ):
                pin = base.pin
            else:
                raise ConfigError(
                    f"no PIN for [{section}]: set {section}.pin_env or {section}.pin_file"
                )
        return TokenRef(module=module, label=label, serial=serial, pin=pin)

    def own_token(self, section: str, main: TokenRef) -> TokenRef:
        """[section]'s own token if it names a module, else the [pkcs11] token."""
        return self.token(section, main) if "module" in self.table(section) else main

    def key(self, section: str, token: TokenRef, default: KeyRef | None) -> KeyRef:
        """The key named by key_label / key_id of [section]; `default`'s names if neither."""
        label = self.text(section, "key_label")
        key_id = self.text(section, "key_id")
        if label is None and key_id is None:
            if default is None:
                raise ConfigError(f"{section}.key_label or {section}.key_id is required")
            return KeyRef(token, default.label, default.id)
        try:
            raw_id = bytes.fromhex(key_id) if key_id is not None else None
        except ValueError:
            raise ConfigError(f"{section}.key_id must be hex, got {key_id!r}") from None
        return KeyRef(token, label, raw_id)

    def check_keys(self, section: str, known: Collection[str], what: str = "") -> None:
        """Refuse a key of [section] that is not in `known` (`what`: a note for the message)."""
        for key in self.table(section):
            if key not in known and {f"{key}_env", f"{key}_file"} <= set(known):
                self.secret(section, key, "")  # an inline secret: says where it goes instead
            if key not in known:
                hint = did_you_mean(key, known, f"{section}.{{}}")
                raise ConfigError(f"{section}.{key}: unknown key{what} in {self.path}{hint}")

    def check_environment(self, known: Collection[str]) -> None:
        """Refuse an HSMSCEP_* variable that is neither a key's override nor in `known`.

        A misspelt override would otherwise be ignored silently, like a misspelt key.
        """
        names = self.consulted | set(known)
        for name in sorted(self.env):
            if name.startswith("HSMSCEP_") and name not in names:
                hint = did_you_mean(name, names, "{}")
                raise ConfigError(
                    f"environment variable {name} matches no configuration key"
                    f" (config file {self.path}){hint}"
                )

    def named_tables(
        self, root: str, reserved: Iterable[str], used_as: str
    ) -> dict[str, dict[str, Any]]:
        """The [<root>.<name>] tables, their names checked (`used_as`: where a name shows)."""
        raw = self.raw.get(root, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"[{root}] must be a table of [{root}.<name>] tables")
        for name, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{root}.{name} must be a table ([{root}.{name}])")
            if not PROFILE_NAME.fullmatch(name) or name in reserved:
                raise ConfigError(
                    f"{root}.{name}: a name is 1-64 letters, digits, '-', '_' or '.' (and not"
                    f" {', '.join(sorted(reserved))}); it is used in {used_as}"
                )
        return raw


def env_name(section: str, key: str) -> str:
    """The variable that overrides section.key: HSMSCEP_<SECTION>_<KEY>."""
    return f"HSMSCEP_{section.replace('.', '_').upper()}_{key.upper()}"


def did_you_mean(word: str, known: Collection[str], form: str) -> str:
    """ "; did you mean X?" with the closest known word (difflib), formatted by `form`."""
    close = difflib.get_close_matches(word, sorted(known), n=1)
    return f"; did you mean {form.format(close[0])}?" if close else ""


class TableReader:
    """Typed access to one TOML sub-table, no environment overrides, strict types."""

    def __init__(self, table: Mapping[str, Any], where: str) -> None:
        self.table, self.where = table, where

    def key(self, key: str) -> str:
        return f"{self.where}.{key}"

    def integer(self, key: str, minimum: int, maximum: int) -> int | None:
        value = self.table.get(key)
        if value is None:
            return None
        # TOML booleans are Python ints; `true` is no number of days.
        if type(value) is not int:
            raise ConfigError(f"{self.key(key)} must be an integer, got {value!r}")
        if not minimum <= value <= maximum:
            raise ConfigError(
                f"{self.key(key)} must be between {minimum} and {maximum}, got {value}"
            )
        return value

    def boolean(self, key: str) -> bool | None:
        value = self.table.get(key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{self.key(key)} must be true or false, got {value!r}")
        return value

    def string(self, key: str) -> str | None:
        value = self.table.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self.key(key)} must be a string, got {value!r}")
        return value

    def names(self, key: str) -> list[str] | None:
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(key)} must be a list of strings, got {value!r}")
        return value

    def regexes(self, key: str) -> list[tuple[str, re.Pattern[str]]] | None:
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.key(key)} must be a table of regular expressions")
        out: list[tuple[str, re.Pattern[str]]] = []
        for name, text in value.items():
            if not isinstance(text, str):
                raise ConfigError(f"{self.key(key)}.{name} must be a string, got {text!r}")
            try:
                out.append((name, re.compile(text)))
            except re.error as exc:
                raise ConfigError(
                    f"{self.key(key)}.{name}: bad regular expression: {exc}"
                ) from None
        return out
