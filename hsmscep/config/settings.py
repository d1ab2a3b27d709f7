"""Settings from one TOML file plus HSMSCEP_* environment overrides, one dataclass per section.

Every check happens while reading, once, and a ConfigError names the key. Secrets (PINs, the
challenge) come from environment variables or files, never from argv, and never reach repr().
Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from hsmscep.config.profiles import read_caps, read_profiles
from hsmscep.config.reader import Reader, env_name
from hsmscep.config.rollover import ROLLOVER_STATE, RolloverState, read_rollover
from hsmscep.config.sections import (
    ALL_CAPS,
    AdminSettings,
    CaSettings,
    CrlSettings,
    EnrollSettings,
    ExtraCa,
    LogSettings,
    MetricsSettings,
    Pkcs11Settings,
    RaSettings,
    RenewalSettings,
    ServerSettings,
    StoreSettings,
)
from hsmscep.errors import ConfigError
from hsmscep.policy.profiles import DEFAULT_CA, DEFAULT_PROFILE, Profiles

SECTIONS = (
    *("server", "pkcs11", "ca", "ra", "ra_decrypt", "enroll", "store", "log", "crl"),
    *("renewal", "admin", "rollover", "profiles", "cas", "metrics"),
)

# The keys of the plain sections ([enroll], [profiles.*] and [cas.*] check their own).
SECTION_KEYS: dict[str, frozenset[str]] = {
    "server": ServerSettings.KEYS,
    "pkcs11": Pkcs11Settings.KEYS,
    "ca": CaSettings.KEYS,
    "ra": RaSettings.KEYS,
    "ra_decrypt": RaSettings.KEYS,
    "store": StoreSettings.KEYS,
    "log": LogSettings.KEYS,
    "crl": CrlSettings.KEYS,
    "renewal": RenewalSettings.KEYS,
    "admin": AdminSettings.KEYS,
    "metrics": MetricsSettings.KEYS,
    "rollover": frozenset({"state"}),
}
# HSMSCEP_* variables that are no key's override: set by the command for its own processes
# (web.balance.TABLE_ENV, web.affinity.ENV), the config path, the Docker dev opt-in, the
# default names of the PIN and challenge variables, and the HTTP tuning variables of
# web/httpproto.py. A new variable of this kind must be added here, or start-up refuses it.
RUNTIME_VARIABLES = frozenset(
    {
        "HSMSCEP_CONFIG",
        "HSMSCEP_DEV",
        "HSMSCEP_CONNECTION_TABLE",
        "HSMSCEP_PIN_CPUS",
        "HSMSCEP_PKCS11_PIN",
        "HSMSCEP_CHALLENGE",
        "HSMSCEP_HTTP_MAX_CONNECTIONS",
        "HSMSCEP_HTTP_REQUEST_TIMEOUT",
        "HSMSCEP_STORE_PASSWORD",  # the default of [store] password_env
    }
)


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole configuration; `for_ca` gives the view of one CA ([ca]/[ra] or [cas.<name>])."""

    config_path: Path
    server: ServerSettings
    pkcs11: Pkcs11Settings
    ca: CaSettings
    ra: RaSettings  # signs CertReps
    ra_decrypt: RaSettings  # decrypts requests; the same key as `ra` unless [ra_decrypt] is set
    enroll: EnrollSettings
    profiles: Profiles  # [enroll] is the default profile; [profiles.<name>] the named ones
    store: StoreSettings
    crl: CrlSettings
    renewal: RenewalSettings
    admin: AdminSettings
    log: LogSettings
    rollover: RolloverState  # of the default CA; empty in the view of a [cas.<name>]
    cas: tuple[ExtraCa, ...] = ()  # [cas.<name>]
    metrics: MetricsSettings = MetricsSettings()

    @property
    def ca_names(self) -> tuple[str, ...]:
        return (DEFAULT_CA, *(ca.name for ca in self.cas))

    @property
    def ra_split(self) -> bool:
        return self.ra.key != self.ra_decrypt.key

    def ca_profiles(self) -> Profiles | None:
        """The profiles whose certificates this CA issues; None if no profile uses it."""
        mine = [p for p in self.profiles.all() if p.ca == self.ca.name]
        if not mine:
            return None
        return Profiles.of(mine[0], mine[1:])

    def for_ca(self, name: str) -> Settings:
        """These settings with the CA, RA and store of CA `name` ("default": [ca]/[ra])."""
        if name == self.ca.name:
            return self
        extra = next((ca for ca in self.cas if ca.name == name), None)
        if extra is None:
            known = ", ".join(self.ca_names)
            raise ConfigError(f"no CA {name!r} is configured (known: {known}); add [cas.{name}]")
        ra = RaSettings(extra.ra_key, extra.ra_cert)
        return replace(
            self,
            ca=CaSettings(extra.ca_key, extra.ca_cert, extra.ca_chain, name=name),
            ra=ra,
            ra_decrypt=ra,
            store=replace(self.store, path=extra.db_path),
            # Rollover covers the default CA only.
            rollover=RolloverState(base=self.rollover.base),
        )


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
    try:
        reader = Reader(raw, env, config_path, SECTIONS)
        for section, keys in SECTION_KEYS.items():
            reader.check_keys(section, keys)
        settings = _settings(reader)
        reader.check_environment(_known_variables(raw))
    except ConfigError as exc:
        if str(config_path) in str(exc):
            raise
        # Every error names the file: an operator may have several, or only the environment.
        raise ConfigError(f"{exc} (in {config_path})") from None
    return settings


def _known_variables(raw: dict[str, object]) -> set[str]:
    """Every plain section's overrides, the runtime variables, and the variables the file
    names as secret sources (any `*_env` value: an operator may call them HSMSCEP_...)."""
    known = set(RUNTIME_VARIABLES)
    for section, keys in SECTION_KEYS.items():
        known.update(env_name(section, key) for key in keys)
    enroll_keys = EnrollSettings.KEYS | EnrollSettings.DEFAULT_ONLY
    known.update(env_name("enroll", key) for key in enroll_keys)
    tables: list[object] = [raw]
    while tables:
        table = tables.pop()
        if isinstance(table, dict):
            for key, value in table.items():
                if isinstance(value, str) and str(key).endswith("_env"):
                    known.add(value)
                tables.append(value)
    return known


def _settings(r: Reader) -> Settings:
    caps = read_caps(r, "server", ALL_CAPS)
    renewal = RenewalSettings.read(r)
    pkcs11 = Pkcs11Settings.read(r)
    ca_token = r.own_token("ca", pkcs11.token)
    ra_token = r.own_token("ra", pkcs11.token)
    ca = CaSettings(
        key=r.key("ca", ca_token, None),
        cert=r.file("ca", "cert", "ca.pem") or r.base / "ca.pem",
        chain=r.file("ca", "chain"),
    )
    ra = RaSettings(r.key("ra", ra_token, None), r.file("ra", "cert", "ra.pem") or r.base)
    ra_decrypt = ra
    has_split = r.present("ra_decrypt")
    if has_split:
        dec_key = r.key("ra_decrypt", r.token("ra_decrypt", ra_token), ra.key)
        dec_cert = r.file("ra_decrypt", "cert")
        if dec_cert is None:
            raise ConfigError("ra_decrypt.cert is required when [ra_decrypt] is configured")
        ra_decrypt = RaSettings(dec_key, dec_cert)

    profiles = read_profiles(r, caps)
    cas = tuple(
        ExtraCa.read(r, name, pkcs11.token)
        for name in r.named_tables("cas", (DEFAULT_CA, "ca"), "/crl/<name>.crl, /ca/<name>.crt")
    )
    ca_names = {DEFAULT_CA, *(extra.name for extra in cas)}
    for profile in profiles.all():
        if profile.ca not in ca_names:
            where = "enroll" if profile.name == DEFAULT_PROFILE else f"profiles.{profile.name}"
            raise ConfigError(
                f"{where}.ca: no CA {profile.ca!r}; define [cas.{profile.ca}] or use one of"
                f" {', '.join(sorted(ca_names))}"
            )
    store = StoreSettings.read(r)
    crl = CrlSettings.read(r)
    admin = AdminSettings.read(r)
    state_path = r.file("rollover", "state", ROLLOVER_STATE) or r.base / ROLLOVER_STATE
    rollover = read_rollover(state_path, r.base, ca_token, ra_token)
    if rollover.in_progress and has_split:
        raise ConfigError(f"{state_path}: CA rollover does not support a separate [ra_decrypt] key")
    current = rollover.current
    if current is not None:
        ca = CaSettings(current.ca_key, current.ca_cert, current.ca_chain, current.cross_cert)
        ra = ra_decrypt = RaSettings(current.ra_key, current.ra_cert)
    default = profiles.default
    return Settings(
        config_path=r.path,
        server=ServerSettings.read(r, caps),
        pkcs11=pkcs11,
        ca=ca,
        ra=ra,
        ra_decrypt=ra_decrypt,
        enroll=EnrollSettings(
            validity_days=r.integer("enroll", "validity_days", 365, 1),
            approval="manual" if default.manual_approval else "auto",
            pending_ttl_hours=r.integer("enroll", "pending_ttl_hours", 72, 1),
            challenge=default.static_challenge,
        ),
        profiles=profiles,
        store=store,
        crl=crl,
        renewal=renewal,
        admin=admin,
        log=LogSettings.read(r),
        rollover=rollover,
        cas=cas,
        metrics=MetricsSettings.read(r, admin.token),
    )
