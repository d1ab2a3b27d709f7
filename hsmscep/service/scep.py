"""The SCEP service: the facade the web layer and the CLI use, wiring the service's parts.

A pkiMessage flows one way: decoded here, then answered by enrollment (PKCSReq, RenewalReq;
authorization and pending on its way), pending (CertPoll) or query (GetCert, GetCRL), each
replying through replies' signing jobs; audit records the answer. publication serves
GetCACaps, GetCACert, GetNextCACert and the CRL. Built once per CA and process.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.hsm.pool import SigningPool
from hsmscep.policy import crl
from hsmscep.policy.issuance import IssuancePolicy, Issuer
from hsmscep.policy.profiles import DEFAULT_CA, Profile, Profiles
from hsmscep.policy.renewal import DEFAULT_RENEWAL, RenewalPolicy
from hsmscep.policy.serials import ordered_serial
from hsmscep.protocol import cms
from hsmscep.protocol.codes import MessageType
from hsmscep.protocol.message import PkiRequest, decode_pki_message
from hsmscep.service.audit import Audit
from hsmscep.service.authorization import chain_for
from hsmscep.service.enrollment import Enrollment
from hsmscep.service.issuing import Issuing
from hsmscep.service.pending import PendingApprovals
from hsmscep.service.ports import KeySet, Store
from hsmscep.service.publication import (
    CA_CERT,
    CA_RA_CERT,
    CRL_CHECK_SECONDS,
    NEXT_CA_CERT,
    Publication,
)
from hsmscep.service.query import Queries
from hsmscep.service.readiness import Readiness
from hsmscep.service.replies import Outcome, Replies, describe_key
from hsmscep.store.records import PendingRequest, Revocation
from hsmscep.webhook.client import WebhookClient

__all__ = ["CA_CERT", "CA_RA_CERT", "NEXT_CA_CERT", "ScepService", "default_policy", "describe_key"]


class ScepService:
    """GetCACaps, GetCACert, PKIOperation and the CRL over an HSM signing pool and a store."""

    def __init__(
        self,
        *,
        pool: SigningPool[KeySet],
        store: Store,
        ca_cert: x509.Certificate,
        ra_certs: list[x509.Certificate],
        chain: list[x509.Certificate],
        policy: IssuancePolicy,
        profiles: Profiles,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        new_serial: Callable[[datetime], int] = ordered_serial,
        nonce: Callable[[], bytes] = cms.random_nonce,
        crl_lifetime: timedelta = timedelta(hours=24),
        renewal: RenewalPolicy = DEFAULT_RENEWAL,
        next_ca_certs: list[x509.Certificate] | None = None,
        webhooks: WebhookClient | None = None,
        cross_cert: x509.Certificate | None = None,
        challenge_event: Callable[[str], None] | None = None,
    ) -> None:
        """`policy` holds what every profile shares (CRL DP, AIA); each profile adds its own
        challenge and template. `webhooks` is required when a profile uses one.
        `challenge_event` hears what became of each one-time challenge (the metrics)."""
        self.pool, self.store, self.policy = pool, store, policy
        # Under load, certificates signed while a commit is gathering join it (groupcommit.py).
        pool.on_job_end(store.batch_with(pool.working))
        self.profiles, self.webhooks, self.renewal = profiles, webhooks, renewal
        if webhooks is None and any(p.webhook or p.notify for p in profiles.all()):
            raise ValueError("a profile uses a webhook: pass a WebhookClient")
        self.issuer = Issuer.of(ca_cert)
        # The profiles' chains decide who may enroll; the CSR policy checks no challenge.
        unchallenged = replace(policy, challenge=None)
        replies = Replies(
            issuer=self.issuer,
            policy=policy,
            clock=clock,
            new_serial=new_serial,
            nonce=nonce,
        )
        issuing = Issuing(pool, store, replies)
        self._publication = publication = Publication(
            pool=pool,
            store=store,
            issuer=self.issuer,
            ra_certs=ra_certs,
            chain=chain,
            profiles=profiles,
            next_ca_certs=next_ca_certs,
            crl_lifetime=crl_lifetime,
            clock=clock,
        )
        self.ca_cert_body = publication.ca_cert_body
        self.ca_cert_type = publication.ca_cert_type
        self.ca_cert_der = publication.ca_cert_der
        # The current CA certified by the previous one (NewWithOld), after a rollover.
        self.cross_cert_der = cross_cert.public_bytes(Encoding.DER) if cross_cert else None
        self._pending = PendingApprovals(
            pool=pool,
            store=store,
            issuing=issuing,
            profiles=profiles,
            unchallenged=unchallenged,
            clock=clock,
        )
        self._enrollment = Enrollment(
            issuing=issuing,
            pending=self._pending,
            profiles=profiles,
            chains={
                p.name: chain_for(p, store, webhooks, clock, challenge_event)
                for p in profiles.all()
            },
            unchallenged=unchallenged,
            renewal=renewal,
            clock=clock,
        )
        self._queries = Queries(issuing, publication)
        self._audit = Audit(profiles, webhooks, clock)
        certs = dict(zip(("CA", "RA", "RA decryption"), (ca_cert, *ra_certs), strict=False))
        self.readiness = Readiness(store, certs, clock)

    async def pki_operation(
        self, der: bytes, client: str = "-", profile: Profile | None = None
    ) -> bytes:
        """Answer a pkiMessage sent to `profile`'s endpoint (default: the default profile);
        MessageError means the request never verified (HTTP 400)."""
        return (await self.answer(der, client, profile))[1].response

    async def answer(
        self, der: bytes, client: str = "-", profile: Profile | None = None
    ) -> tuple[PkiRequest, Outcome]:
        """pki_operation, with the verified request and its outcome (for the metrics)."""
        endpoint = profile or self.profiles.default
        request = decode_pki_message(der)
        kind = request.message_type
        if kind == MessageType.GET_CERT or kind == MessageType.GET_CRL:
            outcome = await self._queries.answer(request)
        elif kind == MessageType.CERT_POLL:
            outcome = await self._pending.poll(request)
        else:
            outcome = await self._enrollment.enroll(request, client, endpoint)
        self._audit.record(request, client, endpoint, outcome)
        return request, outcome

    # ---- publication: GetCACaps, GetCACert, GetNextCACert, the CRL ------------------------

    def ca_caps(self, profile: Profile) -> bytes:
        """The GetCACaps body of an endpoint."""
        return self._publication.ca_caps(profile)

    async def next_ca_cert(self) -> bytes | None:
        """The GetNextCACert reply; None while no next CA is prepared."""
        return await self._publication.next_ca_cert()

    async def current_crl(self) -> bytes:
        """The newest CRL, signing a new one first if a revocation or its age calls for it."""
        return await self._publication.current_crl()

    async def revoke(self, serial: int, reason: str) -> tuple[Revocation, bool]:
        """Revoke by serial (UnknownCertificate if not issued here), then sign the next CRL."""
        return await self._publication.revoke(serial, reason)

    def crl_refresher(self, every: float = CRL_CHECK_SECONDS) -> AbstractAsyncContextManager[None]:
        """Keep the CRL current while the context runs: after revocations and before expiry."""
        return self._publication.crl_refresher(every)

    # ---- manual approval: the operator's side ---------------------------------------------

    async def pending_requests(self) -> list[PendingRequest]:
        """Requests waiting for a decision, oldest first (expired ones included)."""
        return await self._pending.pending_requests()

    async def decide(self, request_id: int, approve: bool) -> tuple[PendingRequest, bool]:
        """Approve or reject a pending request; the certificate is issued at the next poll."""
        return await self._pending.decide(request_id, approve)

    def pending_ttl(self, pending: PendingRequest) -> timedelta:
        """How long a held request waits for a decision: its profile's pending_ttl_hours."""
        return self._pending.pending_ttl(pending)


def default_policy(
    challenge: bytes | None, base_url: str | None = None, ca_name: str = DEFAULT_CA
) -> IssuancePolicy:
    """The issuance policy; with a public base URL, certificates point to their CA's CRL and
    certificate."""
    if base_url is None:
        return IssuancePolicy(challenge=challenge)
    urls = crl.PublicUrls.of(base_url, None if ca_name == DEFAULT_CA else ca_name)
    return IssuancePolicy(
        challenge=challenge,
        crl_distribution_points=urls.crl_distribution_points(),
        authority_information_access=urls.authority_information_access(),
    )
