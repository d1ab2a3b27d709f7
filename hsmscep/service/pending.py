"""Manual approval: hold a request (PENDING), answer polls, record the operator's decision.

A held request is answered PENDING until an operator approves or rejects it; the client
polls with CertPoll/GetCertInitial (RFC 8894 §3.3.3) or re-sends its PKCSReq (§3.3.1.1), and
the poll after an approval gets the certificate, issued then from the stored CSR.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from typing import Literal

from hsmscep.errors import DuplicateSerial, DuplicateTransaction, StoreError
from hsmscep.hsm.pool import SigningPool
from hsmscep.policy.csr import read_csr
from hsmscep.policy.issuance import IssuancePolicy, check_csr, describe_sans
from hsmscep.policy.profiles import Profile, Profiles
from hsmscep.policy.template import apply_template
from hsmscep.protocol.cms import decode_envelope
from hsmscep.protocol.message import PkiRequest
from hsmscep.service.authorization import Candidate
from hsmscep.service.issuing import MAX_SERIAL_ATTEMPTS, Issuing
from hsmscep.service.ports import KeySet, Store
from hsmscep.service.refusal import Refusal
from hsmscep.service.replies import Outcome, Replies, decrypt_key, describe_key
from hsmscep.service.replies import requester_key_sha256 as key_sha256
from hsmscep.store.records import PendingRequest

log = logging.getLogger(__name__)


class PendingApprovals:
    """Requests held for an operator, in the store; answers polls for them."""

    def __init__(
        self,
        *,
        pool: SigningPool[KeySet],
        store: Store,
        issuing: Issuing,
        profiles: Profiles,
        unchallenged: IssuancePolicy,
        clock: Callable[[], datetime],
    ) -> None:
        self.pool, self.store, self.issuing = pool, store, issuing
        self.replies: Replies = issuing.replies
        self.profiles, self._unchallenged, self._clock = profiles, unchallenged, clock
        self.holds_requests = any(p.manual_approval for p in profiles.all())

    async def hold(self, candidate: Candidate) -> Outcome:
        """Keep a checked PKCSReq for approval and answer PENDING."""
        request, cert_request = candidate.request, candidate.cert_request
        pending = PendingRequest(
            transaction_id=request.transaction_id,
            csr_der=candidate.csr_der,
            requester_fingerprint=request.signer_fingerprint,
            requester_key_sha256=key_sha256(request),
            requester_ip=candidate.client,
            subject=candidate.subject,
            sans=describe_sans(cert_request.sans),
            key_description=describe_key(cert_request.public_key),
            created_at=self._clock(),
            profile=candidate.profile.name,
        )
        stored = await self.store.add_pending(pending)
        if stored.created_at != pending.created_at:
            # The same transactionID arrived twice at once: answer as the stored one says.
            return await self.answer(request, stored)
        log.info(
            "request %d (transaction %r, %s, profile %s) waits for approval",
            stored.id,
            stored.transaction_id,
            stored.subject,
            stored.profile,
        )
        outcome = await self.pool.run(partial(self.replies.pending, request))
        return replace(outcome, profile=candidate.profile.name, subject=candidate.subject)

    async def poll(self, request: PkiRequest) -> Outcome:
        """CertPoll/GetCertInitial (RFC 8894 §3.3.3), matched by transactionID."""
        stored = await self.store.get_pending(request.transaction_id)
        if stored is not None:
            return await self.answer(request, stored)
        # Issued without waiting (approval = "auto"): a client that polls gets its certificate.
        issued = await self.store.get_by_transaction(request.transaction_id)
        if issued is not None and issued.public_key_sha256 == key_sha256(request):
            return await self.pool.run(partial(self.replies.send_issued, request, issued))
        return await self.issuing.refuse(request, Refusal.UNKNOWN_TRANSACTION())

    async def answer(self, request: PkiRequest, stored: PendingRequest) -> Outcome:
        """Answer a poll (or re-sent PKCSReq) for a held request as its decision says."""
        profile = self.profiles.get(stored.profile) or self.profiles.default
        refusal = None
        if stored.requester_key_sha256 != key_sha256(request):
            refusal = Refusal.OTHER_REQUESTER()
        elif stored.status == "rejected":
            refusal = Refusal.REQUEST_REJECTED(id=stored.id)
        elif stored.expired(self._clock(), profile.pending_ttl):
            refusal = Refusal.REQUEST_EXPIRED(id=stored.id)
        if refusal is not None:
            outcome = await self.issuing.refuse(request, refusal)
            return replace(outcome, profile=profile.name, subject=stored.subject)
        if stored.status == "pending":
            outcome = await self.pool.run(partial(self.replies.pending, request))
            return replace(outcome, profile=profile.name, subject=stored.subject)
        issued = await self.store.get_by_transaction(stored.transaction_id)
        if issued is not None:
            return await self.pool.run(partial(self.replies.send_issued, request, issued))
        for _ in range(MAX_SERIAL_ATTEMPTS):
            outcome = await self.pool.run(partial(self._issue_approved, request, stored, profile))
            if outcome.record is None:
                return outcome
            try:
                await self.store.put(outcome.record)
            except DuplicateSerial:
                continue
            except DuplicateTransaction:  # another process issued it first
                outcome = await self.issuing.resend(request, outcome)
            await self.store.mark_pending_issued(stored.id)
            return outcome
        raise StoreError("no unique serial number after several attempts")

    def _issue_approved(
        self, request: PkiRequest, stored: PendingRequest, profile: Profile, keys: KeySet
    ) -> Outcome:
        """Issue an approved request's stored CSR, sealed to the polling signer (a job)."""
        try:
            envelope = decode_envelope(request.content)
            _, oaep = decrypt_key(envelope, keys)  # the poll must be encrypted to us too
            # The challenge was checked when the request arrived; it may have changed since.
            csr, parts = read_csr(stored.csr_der)
            cert_request = apply_template(
                check_csr(csr, self._unchallenged, parts), profile.template
            )
            response, record = self.replies.issue(
                request,
                cert_request,
                profile.template,
                envelope,
                oaep,
                stored.transaction_id,
                stored.requester_fingerprint,
                keys,
            )
        except Exception as exc:
            return self.replies.refused(request, exc, keys)
        return Outcome(
            response,
            record,
            f"issued after approval of request {stored.id}",
            envelope,
            oaep,
            profile=profile.name,
            subject=record.subject,
        )

    async def pending_requests(self) -> list[PendingRequest]:
        """Requests waiting for a decision, oldest first (expired ones included)."""
        return await self.store.pending_requests()

    async def decide(self, request_id: int, approve: bool) -> tuple[PendingRequest, bool]:
        """Approve or reject a pending request; the certificate is issued at the next poll."""
        decision: Literal["approved", "rejected"] = "approved" if approve else "rejected"
        return await self.store.decide_pending(
            request_id, decision, self._clock(), self.profiles.pending_ttl
        )

    def pending_ttl(self, pending: PendingRequest) -> timedelta:
        """How long a held request waits for a decision: its profile's pending_ttl_hours."""
        return self.profiles.pending_ttl(pending.profile)
