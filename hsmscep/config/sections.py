"""One frozen dataclass per section of the config file, each knowing its TOML keys.

`KEYS` lists what a section may hold (so refusing unknown keys is one `check_keys` call);
`read` builds the section from the one Reader. Sections that depend on others (the CA and RA
keys after a rollover, the profiles) are put together in hsmscep.config.settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from hsmscep.config.logsection import LogSettings as LogSettings
from hsmscep.config.metricssection import MetricsSettings as MetricsSettings
from hsmscep.config.metricssection import parse_listen as parse_listen
from hsmscep.config.reader import TOKEN_KEYS, Reader
from hsmscep.errors import ConfigError
from hsmscep.hsm.refs import KeyRef, TokenRef
from hsmscep.policy.profiles import DEFAULT_CA

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
class ServerSettings:
    """[server]: where to listen, how many processes and signing threads."""

    KEYS: ClassVar[frozenset[str]] = frozenset(
        {"host", "port", "workers", "pool_size", "pin_cpus", "max_pending", "max_body", "caps"}
    )

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1  # processes; 0 means one per core
    pool_size: int = 0  # signing threads (= HSM sessions) per process; 0: by core count
    pin_cpus: bool = True  # one CPU per worker process when there is one process per CPU
    max_pending: int = 128  # admitted HSM jobs per process before answering 503
    max_body: int = 64 * 1024
    caps: tuple[str, ...] = ALL_CAPS

    @classmethod
    def read(cls, r: Reader, caps: tuple[str, ...]) -> ServerSettings:
        workers_raw = r.get("server", "workers", 1)
        workers = 0 if workers_raw == "auto" else r.integer("server", "workers", 1, 1)
        return cls(
            host=str(r.get("server", "host", "127.0.0.1")),
            port=r.integer("server", "port", 8080, 0),
            workers=workers,
            pool_size=r.integer("server", "pool_size", 0, 0),
            pin_cpus=r.boolean("server", "pin_cpus", True),
            max_pending=r.integer("server", "max_pending", 128, 1),
            max_body=r.integer("server", "max_body", 64 * 1024, 1024),
            caps=caps,
        )


@dataclass(frozen=True, slots=True)
class Pkcs11Settings:
    """[pkcs11]: the token every key lives on unless its section names another module."""

    KEYS: ClassVar[frozenset[str]] = TOKEN_KEYS | {"replicas"}

    token: TokenRef
    # [pkcs11.replicas.<name>]: tokens holding the same keys (HA partitions), used alongside.
    replicas: tuple[TokenRef, ...] = ()

    @classmethod
    def read(cls, r: Reader) -> Pkcs11Settings:
        token = r.token("pkcs11", None)
        names = r.table("pkcs11.replicas")
        if not all(isinstance(t, dict) for t in names.values()):
            raise ConfigError("pkcs11.replicas must hold [pkcs11.replicas.<name>] tables")
        # A replica's unset keys come from [pkcs11]; its PIN too only if it is the same token.
        return cls(token, tuple(r.token(f"pkcs11.replicas.{n}", token) for n in names))


@dataclass(frozen=True, slots=True)
class CaSettings:
    """[ca] (or one [cas.<name>]): the CA key and certificate, after any rollover."""

    KEYS: ClassVar[frozenset[str]] = TOKEN_KEYS | {"key_label", "key_id", "cert", "chain"}

    key: KeyRef
    cert: Path
    chain: Path | None = None  # issuers of a CA signed by an external root
    cross_cert: Path | None = None  # this CA certified by the previous CA (NewWithOld)
    name: str = DEFAULT_CA  # which CA: "default" ([ca]/[ra]) or a [cas.<name>]


@dataclass(frozen=True, slots=True)
class RaSettings:
    """[ra] (signs CertReps) or [ra_decrypt] (decrypts requests; [ra]'s key if absent)."""

    KEYS: ClassVar[frozenset[str]] = TOKEN_KEYS | {"key_label", "key_id", "cert"}

    key: KeyRef
    cert: Path


@dataclass(frozen=True, slots=True)
class EnrollSettings:
    """The server-wide values of [enroll]; the default profile itself is `profiles.default`."""

    KEYS: ClassVar[frozenset[str]] = frozenset(
        {
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
            "renewal_requires_new_key",
        }
    )
    # Only [enroll] has these; only a [profiles.<name>] has "ca".
    DEFAULT_ONLY: ClassVar[frozenset[str]] = frozenset({"require_challenge", "validity_days"})
    NAMED_ONLY: ClassVar[frozenset[str]] = frozenset({"ca"})

    validity_days: int = 365
    approval: Literal["auto", "manual"] = "auto"  # manual: PKCSReqs wait for an operator
    pending_ttl_hours: int = 72  # an undecided request expires after this
    challenge: bytes | None = field(default=None, repr=False)  # the static challenge


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """[admin]: the bearer token of the admin API (None: no admin API, 404)."""

    KEYS: ClassVar[frozenset[str]] = frozenset({"token_env", "token_file"})

    token: str | None = field(default=None, repr=False)

    @classmethod
    def read(cls, r: Reader) -> AdminSettings:
        token = r.secret("admin", "token", "")
        if token is not None and len(token) < 16:
            raise ConfigError("the admin token (admin.token_file / admin.token_env) is too short")
        return cls(token or None)


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """[store]: the SQLite database of one CA, or a PostgreSQL database shared by several nodes
    (`url`, its password from `password_file` / `password_env`, never inline)."""

    KEYS: ClassVar[frozenset[str]] = frozenset(
        {"path", "synchronous", "commit_linger_ms", "url", "password_file", "password_env"}
    )

    path: Path
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    commit_linger_ms: int = 20  # how long a certificate batch may wait for rows being signed
    url: str | None = None  # postgresql://user@host:port/db: the shared store instead of `path`
    password: str | None = field(default=None, repr=False)

    @property
    def location(self) -> str | Path:
        """What the store backends open: the PostgreSQL URL, else the SQLite path."""
        return self.url if self.url is not None else self.path

    @classmethod
    def read(cls, r: Reader) -> StoreSettings:
        synchronous = str(r.get("store", "synchronous", "FULL")).upper()
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError("store.synchronous must be FULL or NORMAL")
        url = r.text("store", "url")
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("postgresql", "postgres"):
                raise ConfigError("store.url must be a postgresql:// URL")
            if parts.password is not None:
                raise ConfigError(
                    "store.url must not carry the password; use store.password_file or"
                    " store.password_env"
                )
        return cls(
            path=r.file("store", "path", "hsmscep.db") or r.base / "hsmscep.db",
            synchronous="FULL" if synchronous == "FULL" else "NORMAL",
            commit_linger_ms=r.integer("store", "commit_linger_ms", 20, 0),
            url=url,
            password=r.secret("store", "password", "HSMSCEP_STORE_PASSWORD"),
        )


@dataclass(frozen=True, slots=True)
class CrlSettings:
    """[crl]: where relying parties fetch the CRL and the CA certificate, and its lifetime."""

    KEYS: ClassVar[frozenset[str]] = frozenset({"base_url", "next_update_hours"})

    base_url: str | None = None  # public http(s) prefix of /crl/ca.crl and /ca.crt
    next_update_hours: int = 24

    @classmethod
    def read(cls, r: Reader) -> CrlSettings:
        base_url = r.text("crl", "base_url")
        if base_url is not None and not base_url.startswith(("http://", "https://")):
            # RFC 5280 §4.2.1.13: relying parties fetch the CRL by HTTP; no other scheme here.
            raise ConfigError(f"crl.base_url must be an http:// or https:// URL, not {base_url!r}")
        return cls(
            base_url=base_url.rstrip("/") if base_url else None,
            next_update_hours=r.integer("crl", "next_update_hours", 24, 1),
        )


@dataclass(frozen=True, slots=True)
class RenewalSettings:
    """[renewal]: RenewalReq with the old certificate's key as the proof."""

    KEYS: ClassVar[frozenset[str]] = frozenset(
        {"enabled", "window_days", "allow_key_reuse", "revoke_replaced"}
    )

    enabled: bool = True  # GetCACaps advertises Renewal exactly when this is set
    window_days: int = 0  # renew only within N days of expiry; 0: any time before
    allow_key_reuse: bool = True
    revoke_replaced: bool = False  # revoke the old certificate (superseded)

    @classmethod
    def read(cls, r: Reader) -> RenewalSettings:
        return cls(
            enabled=r.boolean("renewal", "enabled", True),
            window_days=r.integer("renewal", "window_days", 0, 0),
            allow_key_reuse=r.boolean("renewal", "allow_key_reuse", True),
            revoke_replaced=r.boolean("renewal", "revoke_replaced", False),
        )


@dataclass(frozen=True, slots=True)
class ExtraCa:
    """A CA of its own for some profiles ([cas.<name>]): keys, certificates and store."""

    KEYS: ClassVar[frozenset[str]] = TOKEN_KEYS | {
        "key_label",
        "key_id",
        "cert",
        "chain",
        "ra_key_label",
        "ra_key_id",
        "ra_cert",
        "store",
    }

    name: str
    ca_key: KeyRef
    ca_cert: Path
    ca_chain: Path | None
    ra_key: KeyRef
    ra_cert: Path
    db_path: Path

    @classmethod
    def read(cls, r: Reader, name: str, main_token: TokenRef) -> ExtraCa:
        section = f"cas.{name}"
        r.check_keys(section, cls.KEYS)
        token = r.own_token(section, main_token)
        ca_key = r.key(section, token, None)
        ra_label = r.text(section, "ra_key_label")
        ra_id = r.text(section, "ra_key_id")
        if ra_label is None and ra_id is None:
            raise ConfigError(f"{section}.ra_key_label or {section}.ra_key_id is required")
        try:
            ra_key = KeyRef(token, ra_label, bytes.fromhex(ra_id) if ra_id else None)
        except ValueError:
            raise ConfigError(f"{section}.ra_key_id must be hex, got {ra_id!r}") from None
        if ra_key == ca_key:
            raise ConfigError(f"{section}: the RA key must not be the CA key")
        return cls(
            name=name,
            ca_key=ca_key,
            ca_cert=r.file(section, "cert", f"{name}-ca.pem") or r.base,
            ca_chain=r.file(section, "chain"),
            ra_key=ra_key,
            ra_cert=r.file(section, "ra_cert", f"{name}-ra.pem") or r.base,
            db_path=r.file(section, "store", f"{name}.db") or r.base,
        )
