"""Settings from one TOML file plus HSMSCEP_* environment overrides.

Every check happens here, once, and a ConfigError names the key. Secrets (PINs, the
challenge) come from environment variables or files, never from argv, and never reach repr().
Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from hsmscep.config.webhook import parse_notify, parse_webhook
from hsmscep.errors import ConfigError
from hsmscep.hsm.refs import KeyRef, TokenRef
from hsmscep.policy.challenges import check_ttl
from hsmscep.policy.profiles import (
    CHALLENGE_MODES,
    DEFAULT_CA,
    DEFAULT_PROFILE,
    PROFILE_NAME,
    RESERVED_NAMES,
    ChallengeMode,
    Profile,
    Profiles,
)
from hsmscep.policy.template import DEFAULT_TEMPLATE, parse_template
from hsmscep.policy.webhook import WebhookConfig

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


@dataclass(frozen=True, slots=True)
class ExtraCa:
    """A CA of its own for some profiles ([cas.<name>]): keys, certificates and store."""

    name: str
    ca_key: KeyRef
    ca_cert: Path
    ca_chain: Path | None
    ra_key: KeyRef
    ra_cert: Path
    db_path: Path


ROLLOVER_STATE = "rollover.json"
# Keys of [enroll] and of every [profiles.<name>] table; [enroll] also has the server-wide ones.
_PROFILE_KEYS = {
    "challenge_mode",
    "challenge_env",
    "challenge_file",
    "challenge_ttl_seconds",
    "approval",
    "pending_ttl_hours",
    "caps",
    "ms_template",
    "template",
    "webhook",
    "notify",
}
_ENROLL_KEYS = {"require_challenge", "validity_days"}
_NAMED_PROFILE_KEYS = {"ca"}
_CA_KEYS = {
    "module",
    "token_label",
    "token_serial",
    "pin_env",
    "pin_file",
    "key_label",
    "key_id",
    "cert",
    "chain",
    "ra_key_label",
    "ra_key_id",
    "ra_cert",
    "store",
}


@dataclass(frozen=True, slots=True)
class Settings:
    config_path: Path
    host: str
    port: int
    workers: int  # processes; 0 means one per core
    pool_size: int  # signing threads (= HSM sessions) per process
    pin_cpus: bool  # one CPU per worker process when there is one process per CPU
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
    db_commit_linger_ms: int  # how long a certificate batch may wait for rows being signed
    log_level: str
    profiles: Profiles  # [enroll] is the default profile; [profiles.<name>] the named ones
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
    ca_name: str = DEFAULT_CA  # which CA these CA/RA/store settings describe
    extra_cas: tuple[ExtraCa, ...] = ()  # [cas.<name>]

    @property
    def ca_names(self) -> tuple[str, ...]:
        return (DEFAULT_CA, *(ca.name for ca in self.extra_cas))

    def ca_profiles(self) -> Profiles | None:
        """The profiles whose certificates this CA issues; None if no profile uses it."""
        mine = [p for p in self.profiles.all() if p.ca == self.ca_name]
        if not mine:
            return None
        return Profiles.of(mine[0], mine[1:])

    def for_ca(self, name: str) -> Settings:
        """These settings with the CA, RA and store of CA `name` ("default": [ca]/[ra])."""
        if name == self.ca_name:
            return self
        extra = next((ca for ca in self.extra_cas if ca.name == name), None)
        if extra is None:
            known = ", ".join(self.ca_names)
            raise ConfigError(f"no CA {name!r} is configured (known: {known}); add [cas.{name}]")
        return replace(
            self,
            ca_name=name,
            ca_key=extra.ca_key,
            ca_cert=extra.ca_cert,
            ca_chain=extra.ca_chain,
            ra_sign_key=extra.ra_key,
            ra_sign_cert=extra.ra_cert,
            ra_decrypt_key=extra.ra_key,
            ra_decrypt_cert=extra.ra_cert,
            db_path=extra.db_path,
            # Rollover covers the default CA only.
            rollover_state=None,
            rollover_generation=1,
            next_generation=None,
            awaiting_generation=None,
            ra_previous=(),
            ca_cross_cert=None,
        )

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
            "profiles",
            "cas",
        }
        for section in raw:
            if section not in known:
                raise ConfigError(f"unknown section [{section}] in {path}")

    def table(self, section: str) -> dict[str, Any]:
        """The table at a dotted path ("enroll", "profiles.wifi.template"); {} if absent."""
        table: dict[str, Any] = self.raw
        for part in section.split("."):
            value = table.get(part, {})
            if not isinstance(value, dict):
                raise ConfigError(f"[{section}] must be a table")
            table = value
        return table

    def get(self, section: str, key: str, default: Any = None) -> Any:
        env_key = f"HSMSCEP_{section.replace('.', '_').upper()}_{key.upper()}"
        if env_key in self.env:
            return self.env[env_key]
        return self.table(section).get(key, default)

    def has(self, section: str, key: str) -> bool:
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
        return None if value is None else (self.base / value).resolve()

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

    def profile(
        self, section: str, name: str, server_caps: tuple[str, ...], *, default: bool
    ) -> Profile:
        """[enroll] (the default profile) or one [profiles.<name>] table."""
        table = self.table(section)
        known = _PROFILE_KEYS | (_ENROLL_KEYS if default else _NAMED_PROFILE_KEYS)
        for key in table:
            if key not in known:
                raise ConfigError(f"{section}.{key}: unknown key (profile {name!r})")
        mode = self.challenge_mode(section)
        secret = self.secret(section, "challenge", "HSMSCEP_CHALLENGE" if default else "")
        if mode == "static" and not secret:
            raise ConfigError(
                f"{section}: no challenge configured: set {section}.challenge_env or "
                f"{section}.challenge_file, or {section}.challenge_mode = "
                '"one_time", "webhook" or "none"'
            )
        if mode != "static" and (
            self.has(section, "challenge_env") or self.has(section, "challenge_file")
        ):
            raise ConfigError(
                f'{section}.challenge_env/challenge_file only go with challenge_mode = "static"'
            )
        approval = str(self.get(section, "approval", "auto")).lower()
        if approval not in ("auto", "manual"):
            raise ConfigError(f"{section}.approval must be auto or manual, not {approval!r}")
        webhook = self.webhook(f"{section}.webhook")
        if mode == "webhook" and webhook is None:
            raise ConfigError(
                f'{section}: challenge_mode = "webhook" needs a [{section}.webhook] table'
            )
        if mode != "webhook" and webhook is not None:
            raise ConfigError(
                f'[{section}.webhook] is only used with {section}.challenge_mode = "webhook"'
            )
        if mode == "webhook" and approval == "manual":
            raise ConfigError(
                f'{section}: approval = "manual" cannot be combined with challenge_mode ='
                ' "webhook" (the webhook decides)'
            )
        caps = self.caps(section, list(server_caps)) if self.has(section, "caps") else server_caps
        validity_days = self.integer("enroll", "validity_days", 365, 1)
        base_template = replace(DEFAULT_TEMPLATE, validity=timedelta(days=validity_days))
        template_table = self.table(f"{section}.template")
        template = (
            parse_template(template_table, f"{section}.template", defaults=base_template)
            if template_table
            else base_template
        )
        ms_template = self.text(section, "ms_template")
        if ms_template is not None and not ms_template.strip():
            raise ConfigError(f"{section}.ms_template must not be empty")
        ca = self.text(section, "ca", DEFAULT_CA) if not default else DEFAULT_CA
        ttl_seconds = self.integer(section, "challenge_ttl_seconds", 3600, 1)
        try:
            challenge_ttl = check_ttl(ttl_seconds)
        except ValueError as exc:
            raise ConfigError(f"{section}.challenge_ttl_seconds: {exc}") from None
        return Profile(
            name=name,
            caps=caps,
            challenge_mode=mode,
            static_challenge=secret.encode() if mode == "static" and secret else None,
            template=template,
            manual_approval=approval == "manual",
            pending_ttl=timedelta(hours=self.integer(section, "pending_ttl_hours", 72, 1)),
            ms_template=ms_template,
            webhook=webhook,
            notify=self.webhook(f"{section}.notify", notify=True),
            challenge_ttl=challenge_ttl,
            ca=ca or DEFAULT_CA,
        )

    def challenge_mode(self, section: str) -> ChallengeMode:
        raw = self.get(section, "challenge_mode")
        if raw is None and section == "enroll":
            # The setting before profiles existed: require_challenge = false means none.
            require = self.get("enroll", "require_challenge", True)
            if isinstance(require, str):
                require = require.lower() not in ("0", "false", "no")
            return "static" if require else "none"
        if raw is None:
            return "static"
        if self.has(section, "require_challenge"):
            raise ConfigError(f"{section}: set challenge_mode or require_challenge, not both")
        mode = str(raw).lower()
        for known in CHALLENGE_MODES:
            if mode == known:
                return known
        raise ConfigError(
            f"{section}.challenge_mode must be one of {', '.join(CHALLENGE_MODES)}, not {raw!r}"
        )

    def webhook(self, section: str, *, notify: bool = False) -> WebhookConfig | None:
        table = self.table(section)
        if not table:
            return None
        parse = parse_notify if notify else parse_webhook
        return parse(table, section, self.base, self.env)

    def caps(self, section: str, default: list[str]) -> tuple[str, ...]:
        caps_raw = self.get(section, "caps", default)
        if isinstance(caps_raw, str):
            caps_raw = [c.strip() for c in caps_raw.split(",") if c.strip()]
        if not isinstance(caps_raw, list) or not all(isinstance(c, str) for c in caps_raw):
            raise ConfigError(f"{section}.caps must be a list of strings")
        for cap in caps_raw:
            if cap not in KNOWN_CAPS:
                raise ConfigError(f"{section}.caps: unknown capability {cap!r}")
        # Renewal is advertised only while it is enabled, even if the caps list it.
        if not self.boolean("renewal", "enabled", True):
            caps_raw = [c for c in caps_raw if c != "Renewal"]
        return tuple(caps_raw)

    def extra_cas(self, main_token: TokenRef) -> tuple[ExtraCa, ...]:
        tables = self.named_tables("cas", (DEFAULT_CA, "ca"), "/crl/<name>.crl, /ca/<name>.crt")
        cas = []
        for name, table in tables.items():
            section = f"cas.{name}"
            for key in table:
                if key not in _CA_KEYS:
                    raise ConfigError(f"{section}.{key}: unknown key")
            token = self.token(section, main_token) if "module" in table else main_token
            ca_key = self.key(section, token, None)
            ra_label = self.text(section, "ra_key_label")
            ra_id = self.text(section, "ra_key_id")
            if ra_label is None and ra_id is None:
                raise ConfigError(f"{section}.ra_key_label or {section}.ra_key_id is required")
            try:
                ra_key = KeyRef(token, ra_label, bytes.fromhex(ra_id) if ra_id else None)
            except ValueError:
                raise ConfigError(f"{section}.ra_key_id must be hex, got {ra_id!r}") from None
            if ra_key == ca_key:
                raise ConfigError(f"{section}: the RA key must not be the CA key")
            cas.append(
                ExtraCa(
                    name=name,
                    ca_key=ca_key,
                    ca_cert=self.file(section, "cert", f"{name}-ca.pem") or self.base,
                    ca_chain=self.file(section, "chain"),
                    ra_key=ra_key,
                    ra_cert=self.file(section, "ra_cert", f"{name}-ra.pem") or self.base,
                    db_path=self.file(section, "store", f"{name}.db") or self.base,
                )
            )
        return tuple(cas)

    def settings(self) -> Settings:
        workers_raw = self.get("server", "workers", 1)
        workers = 0 if workers_raw == "auto" else self.integer("server", "workers", 1, 1)
        caps_raw = list(self.caps("server", list(ALL_CAPS)))
        renewal = self.boolean("renewal", "enabled", True)

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

        default_profile = self.profile("enroll", DEFAULT_PROFILE, tuple(caps_raw), default=True)
        named = [
            self.profile(f"profiles.{name}", name, tuple(caps_raw), default=False)
            for name in self.named_tables("profiles", RESERVED_NAMES, "the URL /scep/<name>")
        ]
        try:
            profiles = Profiles.of(default_profile, named)
        except ValueError as exc:
            raise ConfigError(f"profiles: {exc}") from None
        extra_cas = self.extra_cas(main_token)
        ca_names = {DEFAULT_CA, *(ca.name for ca in extra_cas)}
        for profile in profiles.all():
            if profile.ca not in ca_names:
                where = "enroll" if profile.name == DEFAULT_PROFILE else f"profiles.{profile.name}"
                raise ConfigError(
                    f"{where}.ca: no CA {profile.ca!r}; define [cas.{profile.ca}] or use one of"
                    f" {', '.join(sorted(ca_names))}"
                )
        challenge = default_profile.static_challenge
        synchronous = str(self.get("store", "synchronous", "FULL")).upper()
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError("store.synchronous must be FULL or NORMAL")
        assert ra_cert is not None
        base_url = self.text("crl", "base_url")
        if base_url is not None and not base_url.startswith(("http://", "https://")):
            # RFC 5280 §4.2.1.13: relying parties fetch the CRL by HTTP; no other scheme here.
            raise ConfigError(f"crl.base_url must be an http:// or https:// URL, not {base_url!r}")
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
            pin_cpus=self.boolean("server", "pin_cpus", True),
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
            challenge=challenge,
            validity_days=self.integer("enroll", "validity_days", 365, 1),
            db_path=self.file("store", "path", "hsmscep.db") or self.base / "hsmscep.db",
            db_synchronous=synchronous,  # type: ignore[arg-type]
            db_commit_linger_ms=self.integer("store", "commit_linger_ms", 20, 0),
            log_level=str(self.get("log", "level", "INFO")).upper(),
            crl_base_url=base_url.rstrip("/") if base_url else None,
            crl_next_update_hours=self.integer("crl", "next_update_hours", 24, 1),
            renewal_enabled=renewal,
            renewal_window_days=self.integer("renewal", "window_days", 0, 0),
            renewal_allow_key_reuse=self.boolean("renewal", "allow_key_reuse", False),
            renewal_revoke_replaced=self.boolean("renewal", "revoke_replaced", False),
            approval="manual" if default_profile.manual_approval else "auto",
            pending_ttl_hours=self.integer("enroll", "pending_ttl_hours", 72, 1),
            profiles=profiles,
            extra_cas=extra_cas,
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
