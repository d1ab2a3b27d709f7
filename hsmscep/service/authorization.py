"""Who may enroll: small policies, each with one `authorize` method, chained per profile.

A policy runs where what it needs is: renewal-by-signer (service.renewal) before decryption,
the static challenge on the signing worker inside the enrollment job (the hot path: no extra
trip), and the one-time challenge, the webhook and manual approval between decryption and
signing. Each answers ALLOW (or Allow with overrides), HOLD, or a Rejected; the first answer
that is not an Allow ends the chain.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Protocol

from cryptography import x509

from hsmscep.errors import ConfigError, Rejected
from hsmscep.policy.challenges import binding_mismatch, challenge_hash
from hsmscep.policy.csr import challenge_password
from hsmscep.policy.issuance import describe_sans
from hsmscep.policy.profiles import Profile
from hsmscep.policy.request import CertRequest
from hsmscep.policy.template import with_overrides
from hsmscep.policy.webhook import AuthorizationRequest, WebhookConfig
from hsmscep.protocol import cms
from hsmscep.protocol.message import PkiRequest
from hsmscep.service.ports import ChallengeStore
from hsmscep.service.refusal import Refusal
from hsmscep.service.replies import describe_key, spki_sha256
from hsmscep.webhook.client import WebhookClient


@dataclass(frozen=True, slots=True)
class Allow:
    """Go on; `cert_request` set: issue that instead (a webhook's overrides)."""

    cert_request: CertRequest | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    """Keep the request for an operator's decision (manual approval)."""


ALLOW, HOLD = Allow(), Hold()
Verdict = Allow | Hold | Rejected


@dataclass(frozen=True, slots=True)
class Candidate:
    """A decrypted request that passed its profile's checks and waits for the decisions
    (one-time challenge, webhook, operator) before the CA key signs."""

    request: PkiRequest
    client: str
    profile: Profile
    cert_request: CertRequest
    csr_der: bytes
    envelope: cms.Envelope
    oaep: cms.OaepParams | None
    transaction_id: str  # under which the certificate is stored
    challenge: bytes | None = field(repr=False)  # only where the store or a webhook checks it
    signer_serial: int | None = None  # a renewal: the certificate it replaces

    @property
    def subject(self) -> str:
        return self.cert_request.subject.rfc4514_string()


class Check(Protocol):
    """A policy decided on the signing worker from the CSR alone (no I/O, no await)."""

    def authorize(self, csr: x509.CertificateSigningRequest) -> Allow | Rejected: ...


class Decision(Protocol):
    """A policy that needs the store, a webhook or an operator."""

    async def authorize(self, candidate: Candidate) -> Verdict: ...


@dataclass(frozen=True, slots=True)
class StaticChallenge:
    """challenge_mode "static": the CSR carries the profile's shared secret."""

    expected: bytes = field(repr=False)

    def authorize(self, csr: x509.CertificateSigningRequest) -> Allow | Rejected:
        try:
            value = challenge_password(csr)
        except Rejected as refusal:
            return refusal
        if value is None:
            return Refusal.CHALLENGE_MISSING()
        if not hmac.compare_digest(value, self.expected):
            return Refusal.CHALLENGE_MISMATCH()
        return ALLOW


@dataclass(frozen=True, slots=True)
class NoChallenge:
    """No challenge checked on the worker: challenge_mode "none", or a decision follows."""

    def authorize(self, csr: x509.CertificateSigningRequest) -> Allow | Rejected:
        return ALLOW


@dataclass(frozen=True, slots=True)
class OneTimeChallenge:
    """challenge_mode "one_time": the challenge is in the store, unused, and fits the CSR;
    it is consumed atomically (one winner across every process sharing the store)."""

    store: ChallengeStore
    clock: Callable[[], datetime]
    # The metrics: "consumed", "expired" or "refused" per request that presented one.
    event: Callable[[str], None] = field(default=lambda event: None)

    async def authorize(self, candidate: Candidate) -> Verdict:
        verdict, event = await self._check(candidate)
        self.event(event)
        return verdict

    async def _check(self, candidate: Candidate) -> tuple[Verdict, str]:
        if candidate.challenge is None:
            return Refusal.CHALLENGE_MISSING(), "refused"
        digest = challenge_hash(candidate.challenge)
        profile = candidate.profile.name
        stored = await self.store.get_challenge(digest, profile)
        if stored is None:
            return Refusal.UNKNOWN_CHALLENGE(), "refused"
        cert_request = candidate.cert_request
        mismatch = binding_mismatch(
            cert_request.subject.rfc4514_string(),
            describe_sans(cert_request.sans),
            stored.subject_pattern,
            stored.san_pattern,
        )
        if mismatch is not None:
            return Refusal.CHALLENGE_BINDING(mismatch=mismatch), "refused"
        used_by = f"{candidate.transaction_id} {spki_sha256(cert_request.public_key)}"
        now = self.clock()
        if await self.store.consume_challenge(digest, now, used_by, profile):
            return ALLOW, "consumed"
        # The same request again (a client retrying after a lost reply or a 503): the stored
        # certificate, if any, is resent; the challenge is not used twice.
        again = await self.store.get_challenge(digest, profile)
        if again is not None and again.used_by == used_by:
            return ALLOW, "consumed"
        expired = stored.used_at is None and stored.expires_at <= now
        return Refusal.CHALLENGE_USED(), "expired" if expired else "refused"


@dataclass(frozen=True, slots=True)
class WebhookAuthorization:
    """challenge_mode "webhook": an HTTP service decides, and may override subject, SANs and
    validity; its on_error setting decides when it cannot be asked."""

    client: WebhookClient
    config: WebhookConfig

    async def authorize(self, candidate: Candidate) -> Verdict:
        request, cert_request = candidate.request, candidate.cert_request
        challenge = candidate.challenge
        asked = AuthorizationRequest(
            profile=candidate.profile.name,
            transaction_id=request.transaction_id,
            message_type=request.message_type,
            subject=candidate.subject,
            sans=describe_sans(cert_request.sans),
            key=describe_key(cert_request.public_key),
            challenge=challenge.decode("utf-8", "replace") if challenge is not None else None,
            client_ip=candidate.client,
        )
        decision = await self.client.authorize(self.config, asked)
        if not decision.allowed:
            return Refusal.WEBHOOK_DENIED(reason=decision.reason)
        try:
            cert_request = with_overrides(
                cert_request, sans=decision.sans, validity=decision.validity
            )
        except Rejected as refusal:
            return refusal
        if decision.subject is not None:
            cert_request = replace(cert_request, subject=decision.subject)
        return Allow(cert_request)


@dataclass(frozen=True, slots=True)
class ManualApproval:
    """manual_approval: an operator decides; the client polls until then."""

    async def authorize(self, candidate: Candidate) -> Verdict:
        return HOLD


@dataclass(frozen=True, slots=True)
class Chain:
    """A profile's authorization: `check` on the signing worker, then the `decisions` in
    order. Without decisions the request is issued in the job that decrypted it."""

    check: Check
    decisions: tuple[Decision, ...] = ()
    wants_challenge: bool = False  # the candidate carries the CSR's challenge

    async def decide(self, candidate: Candidate) -> tuple[Verdict, Candidate]:
        """The first verdict that is not an Allow (else ALLOW), and the candidate with the
        overrides of the policies that allowed."""
        for policy in self.decisions:
            verdict = await policy.authorize(candidate)
            if not isinstance(verdict, Allow):
                return verdict, candidate
            if verdict.cert_request is not None:
                candidate = replace(candidate, cert_request=verdict.cert_request)
        return ALLOW, candidate


def chain_for(
    profile: Profile,
    store: ChallengeStore,
    webhooks: WebhookClient | None,
    clock: Callable[[], datetime],
    challenge_event: Callable[[str], None] | None = None,
) -> Chain:
    """The chain `profile` configures: its challenge mode, then manual approval if set.
    `challenge_event` hears what became of each one-time challenge presented (metrics)."""
    check: Check = NoChallenge()
    decisions: list[Decision] = []
    if profile.challenge_mode == "static" and profile.static_challenge is not None:
        check = StaticChallenge(profile.static_challenge)
    elif profile.challenge_mode == "one_time":
        one_time = OneTimeChallenge(store, clock)
        if challenge_event is not None:
            one_time = replace(one_time, event=challenge_event)
        decisions.append(one_time)
    elif profile.challenge_mode == "webhook":
        if profile.webhook is None or webhooks is None:
            raise ConfigError(f"profile {profile.name!r}: challenge_mode webhook needs a webhook")
        decisions.append(WebhookAuthorization(webhooks, profile.webhook))
    if profile.manual_approval:
        decisions.append(ManualApproval())
    wants_challenge = profile.challenge_mode == "one_time" or profile.webhook is not None
    return Chain(check, tuple(decisions), wants_challenge)
