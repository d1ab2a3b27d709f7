"""Enrollment profiles: named SCEP endpoints, each with its own rules (pure logic, no I/O).

One server serves several device populations (Intune Wi-Fi, Cisco routers, Jamf Macs). A
profile is reached at /scep/<name> (anything after the name is tolerated, as clients append
`pkiclient.exe`), or chosen by the Microsoft certificate template name a CSR carries
(1.3.6.1.4.1.311.20.2, as NDES clients send it). /scep itself, any other suffix and
/cgi-bin/pkiclient.exe reach the default profile, configured by [enroll].
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from hsmscep.policy.template import DEFAULT_TEMPLATE, CertTemplate
from hsmscep.policy.webhook import WebhookConfig

ChallengeMode = Literal["static", "one_time", "webhook", "none"]
CHALLENGE_MODES: tuple[ChallengeMode, ...] = ("static", "one_time", "webhook", "none")
DEFAULT_PROFILE = "default"
DEFAULT_CA = "default"  # the [ca]/[ra] pair; others are [cas.<name>]
# A profile name is one URL path segment.
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# What clients append to the SCEP URL; never a profile name.
RESERVED_NAMES = frozenset({DEFAULT_PROFILE, "pkiclient.exe"})


@dataclass(frozen=True, slots=True)
class Profile:
    """What one endpoint accepts and issues."""

    name: str
    caps: tuple[str, ...]
    challenge_mode: ChallengeMode
    # The shared secret of challenge_mode "static"; None in every other mode.
    static_challenge: bytes | None = field(default=None, repr=False)
    template: CertTemplate = DEFAULT_TEMPLATE
    manual_approval: bool = False
    pending_ttl: timedelta = timedelta(hours=72)
    ms_template: str | None = None  # a CSR naming this template is handled by this profile
    webhook: WebhookConfig | None = None  # challenge_mode "webhook": who decides
    notify: WebhookConfig | None = None  # told about every issue and denial
    challenge_ttl: timedelta = timedelta(hours=1)  # one-time challenges issued without a TTL
    ca: str = DEFAULT_CA  # which CA issues (and which store keeps) this profile's certificates
    # A renewal must bring a new key, even where [renewal] allow_key_reuse lets it keep one.
    renewal_requires_new_key: bool = False

    @property
    def authorizes_later(self) -> bool:
        """The decision needs the store or a webhook, between decryption and signing."""
        return self.challenge_mode in ("one_time", "webhook")


@dataclass(frozen=True, slots=True)
class Profiles:
    """The default profile and the named ones, looked up by path and by template name."""

    default: Profile
    named: Mapping[str, Profile] = field(default_factory=dict)
    by_template: Mapping[str, Profile] = field(default_factory=dict)

    @classmethod
    def of(cls, default: Profile, named: Iterable[Profile] = ()) -> Profiles:
        """Index the profiles; ValueError on a duplicate name or template name."""
        by_name: dict[str, Profile] = {}
        by_template: dict[str, Profile] = {}
        for profile in (default, *named):
            if profile.name in by_name:
                raise ValueError(f"profile {profile.name!r} is defined twice")
            by_name[profile.name] = profile
            if profile.ms_template is not None:
                key = profile.ms_template.casefold()
                if key in by_template:
                    raise ValueError(
                        f"profiles {by_template[key].name!r} and {profile.name!r} both claim"
                        f" the certificate template {profile.ms_template!r}"
                    )
                by_template[key] = profile
        del by_name[default.name]
        return cls(default, by_name, by_template)

    def all(self) -> tuple[Profile, ...]:
        return (self.default, *self.named.values())

    def get(self, name: str) -> Profile | None:
        """The profile called `name` (the default profile is "default")."""
        return self.default if name == self.default.name else self.named.get(name)

    def pending_ttl(self, name: str) -> timedelta:
        """How long a request held by profile `name` waits for a decision (default profile's
        if that profile no longer exists)."""
        return (self.get(name) or self.default).pending_ttl

    def for_path(self, suffix: str) -> Profile:
        """The profile of /scep/<suffix>: its first segment names a profile, else default."""
        first = suffix.strip("/").split("/", 1)[0]
        return self.named.get(first, self.default)

    def for_template(self, endpoint: Profile, template_name: str | None) -> Profile:
        """The profile a CSR's certificate template name selects, else the endpoint's."""
        if template_name is None:
            return endpoint
        return self.by_template.get(template_name.casefold(), endpoint)
