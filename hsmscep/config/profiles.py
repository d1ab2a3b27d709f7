"""Reading [enroll] (the default profile) and the [profiles.<name>] tables into Profiles.

A profile's template is read by hsmscep.config.template, its webhooks by
hsmscep.config.webhook; what a profile means is hsmscep.policy.profiles.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from hsmscep.config.reader import Reader
from hsmscep.config.sections import KNOWN_CAPS, EnrollSettings
from hsmscep.config.template import parse_template
from hsmscep.config.webhook import parse_notify, parse_webhook
from hsmscep.errors import ConfigError
from hsmscep.policy.challenges import InvalidChallengeRequest, check_ttl
from hsmscep.policy.profiles import (
    CHALLENGE_MODES,
    DEFAULT_CA,
    DEFAULT_PROFILE,
    RESERVED_NAMES,
    ChallengeMode,
    Profile,
    Profiles,
)
from hsmscep.policy.template import DEFAULT_TEMPLATE
from hsmscep.policy.webhook import WebhookConfig


def read_profiles(r: Reader, server_caps: tuple[str, ...]) -> Profiles:
    """[enroll] as the default profile, then every [profiles.<name>]."""
    default = read_profile(r, "enroll", DEFAULT_PROFILE, server_caps, default=True)
    named = [
        read_profile(r, f"profiles.{name}", name, server_caps, default=False)
        for name in r.named_tables("profiles", RESERVED_NAMES, "the URL /scep/<name>")
    ]
    try:
        return Profiles.of(default, named)
    except ValueError as exc:
        raise ConfigError(f"profiles: {exc}") from None


def read_profile(
    r: Reader, section: str, name: str, server_caps: tuple[str, ...], *, default: bool
) -> Profile:
    """[enroll] (the default profile) or one [profiles.<name>] table."""
    only = EnrollSettings.DEFAULT_ONLY if default else EnrollSettings.NAMED_ONLY
    r.check_keys(section, EnrollSettings.KEYS | only, f" (profile {name!r})")
    mode = _challenge_mode(r, section)
    secret = r.secret(section, "challenge", "HSMSCEP_CHALLENGE" if default else "")
    if mode == "static" and not secret:
        raise ConfigError(
            f"{section}: no challenge configured: set {section}.challenge_env or "
            f"{section}.challenge_file, or {section}.challenge_mode = "
            '"one_time", "webhook" or "none"'
        )
    if mode != "static" and (r.has(section, "challenge_env") or r.has(section, "challenge_file")):
        raise ConfigError(
            f'{section}.challenge_env/challenge_file only go with challenge_mode = "static"'
        )
    approval = str(r.get(section, "approval", "auto")).lower()
    if approval not in ("auto", "manual"):
        raise ConfigError(f"{section}.approval must be auto or manual, not {approval!r}")
    webhook = _webhook(r, f"{section}.webhook")
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
    caps = read_caps(r, section, server_caps) if r.has(section, "caps") else server_caps
    validity_days = r.integer("enroll", "validity_days", 365, 1)
    base_template = replace(DEFAULT_TEMPLATE, validity=timedelta(days=validity_days))
    template_table = r.table(f"{section}.template")
    template = (
        parse_template(template_table, f"{section}.template", defaults=base_template)
        if template_table
        else base_template
    )
    ms_template = r.text(section, "ms_template")
    if ms_template is not None and not ms_template.strip():
        raise ConfigError(f"{section}.ms_template must not be empty")
    ca = r.text(section, "ca", DEFAULT_CA) if not default else DEFAULT_CA
    ttl_seconds = r.integer(section, "challenge_ttl_seconds", 3600, 1)
    try:
        challenge_ttl = check_ttl(ttl_seconds)
    except InvalidChallengeRequest as exc:
        raise ConfigError(f"{section}.challenge_ttl_seconds: {exc}") from None
    return Profile(
        name=name,
        caps=caps,
        challenge_mode=mode,
        static_challenge=secret.encode() if mode == "static" and secret else None,
        template=template,
        manual_approval=approval == "manual",
        pending_ttl=timedelta(hours=r.integer(section, "pending_ttl_hours", 72, 1)),
        ms_template=ms_template,
        webhook=webhook,
        notify=_webhook(r, f"{section}.notify", notify=True),
        challenge_ttl=challenge_ttl,
        ca=ca or DEFAULT_CA,
        renewal_requires_new_key=r.boolean(section, "renewal_requires_new_key", False),
    )


def read_caps(r: Reader, section: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """GetCACaps of [server] or of a profile; Renewal only while [renewal] is enabled."""
    caps_raw = r.get(section, "caps", list(default))
    if isinstance(caps_raw, str):
        caps_raw = [c.strip() for c in caps_raw.split(",") if c.strip()]
    if not isinstance(caps_raw, list) or not all(isinstance(c, str) for c in caps_raw):
        raise ConfigError(f"{section}.caps must be a list of strings")
    for cap in caps_raw:
        if cap not in KNOWN_CAPS:
            raise ConfigError(f"{section}.caps: unknown capability {cap!r}")
    # Renewal is advertised only while it is enabled, even if the caps list it.
    if not r.boolean("renewal", "enabled", True):
        caps_raw = [c for c in caps_raw if c != "Renewal"]
    return tuple(caps_raw)


def _challenge_mode(r: Reader, section: str) -> ChallengeMode:
    raw = r.get(section, "challenge_mode")
    if raw is None and section == "enroll":
        # The setting before profiles existed: require_challenge = false means none.
        require = r.get("enroll", "require_challenge", True)
        if isinstance(require, str):
            require = require.lower() not in ("0", "false", "no")
        return "static" if require else "none"
    if raw is None:
        return "static"
    if r.has(section, "require_challenge"):
        raise ConfigError(f"{section}: set challenge_mode or require_challenge, not both")
    mode = str(raw).lower()
    for known in CHALLENGE_MODES:
        if mode == known:
            return known
    raise ConfigError(
        f"{section}.challenge_mode must be one of {', '.join(CHALLENGE_MODES)}, not {raw!r}"
    )


def _webhook(r: Reader, section: str, *, notify: bool = False) -> WebhookConfig | None:
    table = r.table(section)
    if not table:
        return None
    parse = parse_notify if notify else parse_webhook
    return parse(table, section, r.base, r.env)
