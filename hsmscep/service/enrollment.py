"""PKCSReq and RenewalReq (RFC 8894 §3.3.1): open, authorize, issue and store.

The hot path (a challenge checked on the worker, no decision pending) is one signing job that
decrypts, checks, issues and signs the CertRep, and one group-committed store write. A profile
whose chain has decisions gets a second job once they allow. A renewal is a RenewalReq, or a
PKCSReq signed by a certificate we issued (interop-quirks #11); it is authorized by its signer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from functools import partial

from cryptography.hazmat.primitives.asymmetric import rsa

from hsmscep.errors import Rejected
from hsmscep.policy.csr import CsrParts, read_csr
from hsmscep.policy.csr import challenge_password as csr_challenge
from hsmscep.policy.issuance import IssuancePolicy, check_csr
from hsmscep.policy.profiles import Profile, Profiles
from hsmscep.policy.renewal import (
    RenewalPolicy,
    names_our_ca,
    renewal_transaction_id,
    renewed_request,
)
from hsmscep.policy.template import apply_template, check_key, ms_template_name
from hsmscep.protocol.cms import decode_envelope
from hsmscep.protocol.codes import MessageType
from hsmscep.protocol.message import PkiRequest
from hsmscep.service.authorization import Candidate, Chain, Hold
from hsmscep.service.binding import check_key_binding
from hsmscep.service.issuing import Issuing
from hsmscep.service.pending import PendingApprovals
from hsmscep.service.ports import KeySet
from hsmscep.service.refusal import Refusal
from hsmscep.service.renewal import SignerRenewal
from hsmscep.service.replies import Outcome, decrypt_key

log = logging.getLogger(__name__)

_ENROLLMENTS = (MessageType.PKCS_REQ, MessageType.RENEWAL_REQ)


class Enrollment:
    """Answers PKCSReq and RenewalReq."""

    def __init__(
        self,
        *,
        issuing: Issuing,
        pending: PendingApprovals,
        profiles: Profiles,
        chains: dict[str, Chain],
        unchallenged: IssuancePolicy,
        renewal: RenewalPolicy,
        clock: Callable[[], datetime],
    ) -> None:
        """`unchallenged`: the baseline CSR policy; the chains decide who may enroll."""
        self.issuing, self.pending, self.profiles = issuing, pending, profiles
        self.store, self.replies = issuing.store, issuing.replies
        self._chains, self._policy, self._renewal, self._clock = (
            chains,
            unchallenged,
            renewal,
            clock,
        )
        ca_cert = self.replies.issuer.certificate
        self._signer_renewal = SignerRenewal(self.store, ca_cert, renewal, clock)
        self._ca_subject_der = ca_cert.subject.public_bytes()
        self._ca_key_id = self.replies.issuer.authority_key_id.key_identifier

    async def enroll(self, request: PkiRequest, client: str, endpoint: Profile) -> Outcome:
        """Answer a PKCSReq or RenewalReq (any other messageType is refused)."""
        if request.message_type not in _ENROLLMENTS:
            return await self.issuing.refuse(request, Refusal.UNSUPPORTED_MESSAGE_TYPE())
        # Only a signer that names our CA costs a store read: the hot path (a self-signed
        # PKCSReq) stays a byte comparison away from today's challenge path.
        renewing = self._renewal.enabled and names_our_ca(
            request.signer_issuer_der, request.signer_cert, self._ca_subject_der, self._ca_key_id
        )
        if renewing:
            verdict = await self._signer_renewal.authorize(request)
            if isinstance(verdict, Rejected):
                return await self.issuing.refuse(request, verdict)
        elif request.message_type == MessageType.RENEWAL_REQ:
            refusal = (
                Refusal.RENEWAL_NOT_SIGNED_HERE
                if self._renewal.enabled
                else Refusal.RENEWAL_DISABLED
            )
            return await self.issuing.refuse(request, refusal())
        elif self.pending.holds_requests:
            # A re-sent PKCSReq of a held request is a poll (RFC 8894 §3.3.1.1).
            stored = await self.store.get_pending(request.transaction_id)
            if stored is not None:
                return await self.pending.answer(request, stored)
        opened = await self.issuing.issue_and_store(
            partial(self._open, request, renewing, endpoint, client)
        )
        outcome = await self._decide(opened) if isinstance(opened, Candidate) else opened
        if outcome.resent:
            outcome = await self.issuing.resend(request, outcome)
        if (
            renewing
            and self._renewal.revoke_replaced
            and outcome.record is not None
            and outcome.record.serial != request.signer_serial
        ):
            # After the new certificate is stored; a failure here is a 503 and the client's
            # retry (same transactionID) gets the same certificate and revokes again.
            await self._revoke_replaced(request)
        return outcome

    async def _decide(self, candidate: Candidate) -> Outcome:
        """Run the profile's decisions; issue, hold or refuse as they say."""
        verdict, candidate = await self._chains[candidate.profile.name].decide(candidate)
        if isinstance(verdict, Rejected):
            outcome = await self.issuing.refuse(candidate.request, verdict)
            return replace(outcome, profile=candidate.profile.name, subject=candidate.subject)
        if isinstance(verdict, Hold):
            return await self.pending.hold(candidate)
        return await self.issuing.issue_and_store(partial(self._issue, candidate))

    async def _revoke_replaced(self, request: PkiRequest) -> None:
        serial = request.signer_serial
        _, newly = await self.store.revoke(serial, "superseded", self._clock())
        if newly:
            log.info("revoked %x (superseded) after renewal %r", serial, request.transaction_id)

    # ---- jobs: these run on a signing worker thread with that thread's keys ------------

    def _open(
        self, request: PkiRequest, renewing: bool, endpoint: Profile, client: str, keys: KeySet
    ) -> Outcome | Candidate:
        """Decrypt and check a request against its profile, and issue at once unless the
        profile's chain has decisions to make first (then: the Candidate)."""
        parts: CsrParts | None = None  # its subject_text: the refusal's audit line
        profile = endpoint
        try:
            if not isinstance(request.signer_key, rsa.RSAPublicKey):
                raise Refusal.REPLY_KEY_NOT_RSA()
            envelope = decode_envelope(request.content)
            cek, oaep = decrypt_key(envelope, keys)
            csr_der = envelope.open(cek)
            csr, parts = read_csr(csr_der, request.signer_key)
            profile = self.profiles.for_template(endpoint, ms_template_name(csr))
            chain = self._chains[profile.name]
            if not renewing:
                # Before the challenge is looked at: a lifted envelope must not burn it.
                check_key_binding(
                    request.signer_cert,
                    request.signer_key,
                    parts.public_key,
                    self.replies.issuer.certificate,
                    (request.signer_issuer_der, request.signer_subject_der),
                )
                verdict = chain.check.authorize(csr)
                if isinstance(verdict, Rejected):
                    raise verdict
                cert_request = apply_template(check_csr(csr, self._policy, parts), profile.template)
                transaction_id = request.transaction_id
            else:
                # A renewal is authenticated by the signer certificate, not by the challenge,
                # and keeps the old subject and SANs: of the template, only the key rules apply.
                checked_csr = check_csr(csr, self._policy, parts)
                check_key(checked_csr.public_key, profile.template)
                cert_request = renewed_request(
                    request.signer_cert,
                    checked_csr,
                    self._renewal,
                    requires_new_key=profile.renewal_requires_new_key,
                )
                transaction_id = renewal_transaction_id(
                    request.transaction_id, request.signer_serial
                )
            candidate = Candidate(
                request=request,
                client=client,
                profile=profile,
                cert_request=cert_request,
                csr_der=csr_der,
                envelope=envelope,
                oaep=oaep,
                transaction_id=transaction_id,
                challenge=csr_challenge(csr) if chain.wants_challenge else None,
                signer_serial=request.signer_serial if renewing else None,
            )
            if chain.decisions and not renewing:
                return candidate
            return self._issue(candidate, keys)
        except Exception as exc:
            subject = parts.subject_text if parts is not None else None
            outcome = self.replies.refused(request, exc, keys)
            return replace(outcome, profile=profile.name, subject=subject)

    def _issue(self, candidate: Candidate, keys: KeySet) -> Outcome:
        """Sign the certificate of an authorized request and the SUCCESS CertRep carrying it."""
        serial = candidate.signer_serial
        request = candidate.request
        response, record = self.replies.issue(
            request,
            candidate.cert_request,
            candidate.profile.template,
            candidate.envelope,
            candidate.oaep,
            candidate.transaction_id,
            request.signer_fingerprint,
            keys,
        )
        return Outcome(
            response,
            record,
            "issued" if serial is None else f"renewed {serial:x}",
            candidate.envelope,
            candidate.oaep,
            profile=candidate.profile.name,
            subject=record.subject,
        )
