"""Settings from one TOML file plus HSMSCEP_* environment overrides.

Every check happens here, once, and a ConfigError names the key. Secrets (PINs, the
challenge) come from environment variables or files, never from argv, and never reach repr().
Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hsmscep.errors import ConfigError
from hsmscep.hsm import KeyRef, TokenRef

ALL_CAPS = (
    "POSTPKIOperation",
    "SHA-1",
    "SHA-256",
    "SHA-512",
    "AES",
    "DES3",
    "SCEPStandard",
    "Renewal",
)
KNOWN_CAPS = frozenset(ALL_CAPS) | {"GetNextCACert", "SHA-224", "SHA-384", "Update"}


@dataclass(frozen=True, slots=True)
class Generation:
    """The CA and RA keys and certificates of one rollover generation."""

    ca_key: KeyRef
    ca_cert: Path
    ra_key: KeyRef
    ra_cert: Path
    ca_chain: Path | None = None  # issuers of a next CA signed by an external root
    # NewWithOld: the CA's key and subject certified by the previous (self-signed) CA, so that
    # clients trusting only the previous root can still build a path to the new CA.
    cross_cert: Path | None = None


ROLLOVER_STATE = "rollover.json"


@dataclass(frozen=True, slots=True)
class Settings:
    config_path: Path
    host: str
    port: int
    workers: int  # processes; 0 means one per core
    pool_size: int  # signing threads (= HSM sessions) per process
    max_pending: int  # admitted HSM jobs per process before answering 503
    max_body: int
    caps: tuple[str, ...]
    ca_key: KeyRef
    ca_cert: Path
    ca_chain: Path | None
    ra_sign_key: KeyRef
    ra_sign_cert: Path
    ra_decrypt_key: KeyRef
    ra_decrypt_cert: Path
    challenge: bytes | None = field(repr=False)
    validity_days: int
    db_path: Path
    db_synchronous: Literal["FULL", "NORMAL"]
    log_level: str
    crl_base_url: str | None = None  # public http(s) prefix of /crl/ca.crl and /ca.crt
    crl_next_update_hours: int = 24
    renewal_enabled: bool = True  # GetCACaps advertises Renewal exactly when this is set
    renewal_window_days: int = 0  # renew only within N days of expiry; 0: any time before
    renewal_allow_key_reuse: bool = False
    renewal_revoke_replaced: bool = False  # revoke the old certificate (superseded)
    approval: Literal["auto", "manual"] = "auto"  # manual: PKCSReqs wait for an operator
    pending_ttl_hours: int = 72  # an undecided request expires after this
    admin_token: str | None = field(default=None, repr=False)  # None: no admin API (404)
    # CA rollover, from the state file `hsmscep rollover prepare|activate` writes.
    rollover_state: Path | None = None
    rollover_generation: int = 1  # of the current CA and RA keys
    next_generation: Generation | None = None  # prepared, served by GetNextCACert
    awaiting_generation: Generation | None = None  # keys made, CA CSR out at the external root
    ra_previous: tuple[tuple[KeyRef, Path], ...] = ()  # old RA keys, still decrypting
    ca_cross_cert: Path | None = None  # the current CA certified by the previous CA (NewWithOld)

    @property
    def ra_split(self) -> bool:
        return self.ra_sign_key != self.ra_decrypt_key


def load_settings(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> Settings:
    """Read the TOML file at `path`, apply HSMSCEP_<SECTION>_<KEY> overrides, validate."""
    env = os.environ if environ is None else environ
    config_path = Path(path).resolve()
    try:
        raw = tomllib.loads(config_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {config_path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    return _Reader(raw, env, config_path).settings()


class _Reader:
    def __init__(self, raw: dict[str, Any], env: Mapping[str, str], path: Path) -> None:
        self.raw, self.env, self.path, self.base = raw, env, path, path.parent
        known = {
            *("server", "pkcs11", "ca", "ra", "ra_decrypt", "enroll", "store", "log", "crl"),
            "renewal",
            "admin",
            "rollover",
        }
        for section in raw:
            if section not in known:
                raise ConfigError(f"unknown section [{section}] in {path}")

    def get(self, section: str, key: str, default: Any = None) -> Any:
        env_key = f"HSMSCEP_{section.upper()}_{key.upper()}"
        if env_key in self.env:
            return self.env[env_key]
        value = self.raw.get(section, {})
        if not isinstance(value, dict):
            raise ConfigError(f"[{section}] must be a table")
        return value.get(key, default)

    def has(self, section: str, key: str) -> bool:
        table = self.raw.get(section, {})
        return isinstance(table, dict) and key in table

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
        return None if value is None else (self.base / value).resolve()

    def secret(self, section: str, key: str, default_env: str) -> str | None:
        """A secret from `<key>_env` (an env var name) or `<key>_file`; never inline."""
        if key in self.raw.get(section, {}):
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

    def key(self, section: str, token: TokenRef, default: KeyRef | None) -> KeyRef:
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

    def settings(self) -> Settings:
        workers_raw = self.get("server", "workers", 1)
        workers = 0 if workers_raw == "auto" else self.integer("server", "workers", 1, 1)
        caps_raw = self.get("server", "caps", list(ALL_CAPS))
        if isinstance(caps_raw, str):
            caps_raw = [c.strip() for c in caps_raw.split(",") if c.strip()]
        if not isinstance(caps_raw, list) or not all(isinstance(c, str) for c in caps_raw):
            raise ConfigError("server.caps must be a list of strings")
        for cap in caps_raw:
            if cap not in KNOWN_CAPS:
                raise ConfigError(f"server.caps: unknown capability {cap!r}")
        # Renewal is advertised only while it is enabled, even if server.caps lists it.
        renewal = self.boolean("renewal", "enabled", True)
        if not renewal:
            caps_raw = [c for c in caps_raw if c != "Renewal"]

        main_token = self.token("pkcs11", None)
        ca_token = (
            self.token("ca", main_token) if "module" in self.raw.get("ca", {}) else main_token
        )
        ra_token = (
            self.token("ra", main_token) if "module" in self.raw.get("ra", {}) else main_token
        )
        ca_key = self.key("ca", ca_token, None)
        ra_key = self.key("ra", ra_token, None)
        has_split = bool(self.raw.get("ra_decrypt"))
        dec_token = self.token("ra_decrypt", ra_token) if has_split else ra_token
        dec_key = self.key("ra_decrypt", dec_token, ra_key) if has_split else ra_key
        ra_cert = self.file("ra", "cert", "ra.pem")
        dec_cert = self.file("ra_decrypt", "cert") if has_split else ra_cert
        if dec_cert is None:
            raise ConfigError("ra_decrypt.cert is required when [ra_decrypt] is configured")

        require = self.get("enroll", "require_challenge", True)
        if isinstance(require, str):
            require = require.lower() not in ("0", "false", "no")
        challenge = self.secret("enroll", "challenge", "HSMSCEP_CHALLENGE")
        if require and not challenge:
            raise ConfigError(
                "no challenge configured: set enroll.challenge_env or enroll.challenge_file, "
                "or enroll.require_challenge = false to enroll without one"
            )
        synchronous = str(self.get("store", "synchronous", "FULL")).upper()
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError("store.synchronous must be FULL or NORMAL")
        assert ra_cert is not None
        base_url = self.text("crl", "base_url")
        if base_url is not None and not base_url.startswith(("http://", "https://")):
            # RFC 5280 §4.2.1.13: relying parties fetch the CRL by HTTP; no other scheme here.
            raise ConfigError(f"crl.base_url must be an http:// or https:// URL, not {base_url!r}")
        approval = str(self.get("enroll", "approval", "auto")).lower()
        if approval not in ("auto", "manual"):
            raise ConfigError(f"enroll.approval must be auto or manual, not {approval!r}")
        admin_token = self.secret("admin", "token", "")
        if admin_token is not None and len(admin_token) < 16:
            raise ConfigError("the admin token (admin.token_file / admin.token_env) is too short")
        state_path = self.file("rollover", "state", ROLLOVER_STATE)
        assert state_path is not None
        state = _RolloverState.read(state_path, self.base, ca_token, ra_token)
        ca_cert = self.file("ca", "cert", "ca.pem") or self.base / "ca.pem"
        ca_chain = self.file("ca", "chain")
        cross_cert: Path | None = None
        if state.current is not None or state.next is not None or state.awaiting_cert is not None:
            if has_split:
                raise ConfigError(
                    f"{state_path}: CA rollover does not support a separate [ra_decrypt] key"
                )
        if state.current is not None:
            current = state.current
            ca_key, ca_cert, ca_chain = current.ca_key, current.ca_cert, current.ca_chain
            cross_cert = current.cross_cert
            ra_key = dec_key = current.ra_key
            ra_cert = dec_cert = current.ra_cert
        return Settings(
            config_path=self.path,
            host=str(self.get("server", "host", "127.0.0.1")),
            port=self.integer("server", "port", 8080, 0),
            workers=workers,
            pool_size=self.integer("server", "pool_size", 0, 0),
            max_pending=self.integer("server", "max_pending", 128, 1),
            max_body=self.integer("server", "max_body", 64 * 1024, 1024),
            caps=tuple(caps_raw),
            ca_key=ca_key,
            ca_cert=ca_cert,
            ca_chain=ca_chain,
            ra_sign_key=ra_key,
            ra_sign_cert=ra_cert,
            ra_decrypt_key=dec_key,
            ra_decrypt_cert=dec_cert,
            challenge=challenge.encode() if (require and challenge) else None,
            validity_days=self.integer("enroll", "validity_days", 365, 1),
            db_path=self.file("store", "path", "hsmscep.db") or self.base / "hsmscep.db",
            db_synchronous=synchronous,  # type: ignore[arg-type]
            log_level=str(self.get("log", "level", "INFO")).upper(),
            crl_base_url=base_url.rstrip("/") if base_url else None,
            crl_next_update_hours=self.integer("crl", "next_update_hours", 24, 1),
            renewal_enabled=renewal,
            renewal_window_days=self.integer("renewal", "window_days", 0, 0),
            renewal_allow_key_reuse=self.boolean("renewal", "allow_key_reuse", False),
            renewal_revoke_replaced=self.boolean("renewal", "revoke_replaced", False),
            approval=approval,  # type: ignore[arg-type]
            pending_ttl_hours=self.integer("enroll", "pending_ttl_hours", 72, 1),
            admin_token=admin_token or None,
            rollover_state=state_path,
            rollover_generation=state.generation,
            next_generation=state.next,
            awaiting_generation=state.awaiting_cert,
            ra_previous=state.previous_ra,
            ca_cross_cert=cross_cert,
        )


@dataclass(frozen=True, slots=True)
class _RolloverState:
    """The rollover state file (JSON, written by `hsmscep rollover`):

    {"generation": 2,
     "current": {"ca_key_label": L, "ca_cert": P, "ra_key_label": L, "ra_cert": P} | null,
     "next": {...the same keys...} | null,
     "awaiting_cert": {...the same keys...} | null,
     "previous_ra": [{"key_label": L, "key_id": HEX | null, "cert": P}, ...]}

    Generations may also name "ca_chain" (a PEM file of external issuers) and "cross_cert" (a
    PEM file: the generation's CA key and subject certified by the previous self-signed CA,
    which must exist and be readable). `awaiting_cert` is a
    generation whose keys exist but whose CA certificate the external root has yet to sign.

    `current` (when set) replaces [ca] key/cert/chain and [ra] key/cert; keys live on the
    [ca] and [ra] tokens. Paths are relative to the config file.
    """

    generation: int
    current: Generation | None
    next: Generation | None
    awaiting_cert: Generation | None
    previous_ra: tuple[tuple[KeyRef, Path], ...]

    @classmethod
    def read(cls, path: Path, base: Path, ca: TokenRef, ra: TokenRef) -> _RolloverState:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(1, None, None, None, ())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"rollover.state: cannot read {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"rollover.state: {path} must hold a JSON object")
        unknown = set(raw) - {"generation", "current", "next", "awaiting_cert", "previous_ra"}
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
        generation = raw.get("generation", 1)
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
            raise ConfigError(f"{path}: generation must be a positive integer")

        def text(entry: dict[str, Any], where: str, key: str) -> str:
            value = entry.get(key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{path}: {where}.{key} must be a non-empty string")
            return value

        def gen(where: str) -> Generation | None:
            entry = raw.get(where)
            if entry is None:
                return None
            if not isinstance(entry, dict):
                raise ConfigError(f"{path}: {where} must be an object or null")
            unknown = set(entry) - {
                "ca_key_label",
                "ca_cert",
                "ra_key_label",
                "ra_cert",
                "ca_chain",
                "cross_cert",
            }
            if unknown:
                raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} in {where}")
            chain = text(entry, where, "ca_chain") if entry.get("ca_chain") is not None else None
            cross: Path | None = None
            if entry.get("cross_cert") is not None:
                cross = base / text(entry, where, "cross_cert")
                try:
                    cross.read_bytes()
                except OSError as exc:
                    raise ConfigError(
                        f"{path}: {where}.cross_cert: cannot read {cross}: {exc.strerror or exc}"
                    ) from None
            return Generation(
                ca_key=KeyRef(ca, text(entry, where, "ca_key_label")),
                ca_cert=base / text(entry, where, "ca_cert"),
                ra_key=KeyRef(ra, text(entry, where, "ra_key_label")),
                ra_cert=base / text(entry, where, "ra_cert"),
                ca_chain=base / chain if chain is not None else None,
                cross_cert=cross,
            )

        previous_raw = raw.get("previous_ra", [])
        if not isinstance(previous_raw, list):
            raise ConfigError(f"{path}: previous_ra must be a list")
        previous = []
        for index, entry in enumerate(previous_raw):
            where = f"previous_ra[{index}]"
            if not isinstance(entry, dict):
                raise ConfigError(f"{path}: {where} must be an object")
            label = entry.get("key_label")
            key_id = entry.get("key_id")
            if not isinstance(label, str | None) or not isinstance(key_id, str | None):
                raise ConfigError(f"{path}: {where}.key_label and key_id must be strings")
            if label is None and key_id is None:
                raise ConfigError(f"{path}: {where}.key_label or {where}.key_id is required")
            try:
                raw_id = bytes.fromhex(key_id) if key_id is not None else None
            except ValueError:
                raise ConfigError(f"{path}: {where}.key_id must be hex") from None
            previous.append((KeyRef(ra, label, raw_id), base / text(entry, where, "cert")))
        return cls(generation, gen("current"), gen("next"), gen("awaiting_cert"), tuple(previous))
