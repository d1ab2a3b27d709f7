"""The SCEP operations, tying the pure core to the signing pool and the store.

The only module that awaits both. A PKIOperation costs one trip to a signing worker, which
decrypts, checks, issues and signs the CertRep in one go, and one group-committed store write
that completes before the response is returned. Everything a request needs that does not
change (GetCACert/GetCACaps bodies, parsed certificates) is built in the constructor.
GetCert and GetCRL cost a decryption trip, a store read and a signing trip. The CRL lives in
the store, so every server process (and the CLI that revokes) agrees on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmscep.errors import (
    DuplicateSerial,
    DuplicateTransaction,
    HsmError,
    MessageError,
    Rejected,
    StoreError,
    UnsupportedAlgorithm,
)
from hsmscep.hsm.pool import Deferred, Finish, SigningPool
from hsmscep.policy import crl
from hsmscep.policy.challenges import binding_mismatch, challenge_hash
from hsmscep.policy.issuance import (
    IssuancePolicy,
    Issuer,
    build_certificate,
    challenge_password,
    check_csr,
    describe_sans,
    load_csr,
)
from hsmscep.policy.profiles import DEFAULT_CA, Profile, Profiles
from hsmscep.policy.renewal import (
    DEFAULT_RENEWAL,
    RenewalPolicy,
    StoredSigner,
    check_signer,
    names_our_ca,
    renewal_transaction_id,
    renewed_request,
)
from hsmscep.policy.request import CertRequest
from hsmscep.policy.template import apply_template, check_key, ms_template_name, with_overrides
from hsmscep.policy.webhook import AuthorizationRequest
from hsmscep.protocol import cms
from hsmscep.protocol.algorithms import CIPHERS_BY_NAME, ContentCipher
from hsmscep.protocol.certrep import (
    build_cert_rep,
    seal_certificates,
    seal_reply,
    sign_next_ca_certs,
)
from hsmscep.protocol.cms import decode_envelope
from hsmscep.protocol.codes import FailInfo, MessageType, PkiStatus
from hsmscep.protocol.message import PkiRequest, decode_pki_message
from hsmscep.service.ports import KeySet, Store
from hsmscep.store.records import CrlInfo, IssuedCert, PendingRequest, Revocation
from hsmscep.webhook.client import WebhookClient

log = logging.getLogger(__name__)
audit = logging.getLogger("hsmscep.audit")

CA_RA_CERT = "application/x-x509-ca-ra-cert"
CA_CERT = "application/x-x509-ca-cert"
NEXT_CA_CERT = "application/x-x509-next-ca-cert"
MAX_SERIAL_ATTEMPTS = 3
MAX_CRL_ATTEMPTS = 5
CRL_CHECK_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class _Outcome:
    response: bytes
    record: IssuedCert | None
    reason: str
    envelope: cms.Envelope | None = None
    oaep: cms.OaepParams | None = None
    profile: str | None = None  # the profile that decided; None: the endpoint's
    subject: str | None = None  # of the CSR, once it was read
    fail_info: FailInfo | None = None  # set on FAILURE
    pending: bool = False  # PENDING (manual approval)
    resent: bool = False  # the transaction already had a certificate: send that one instead


@dataclass(frozen=True, slots=True)
class _Checked:
    """A decrypted request that passed its profile's checks and waits for a decision
    (one-time challenge, webhook, operator) before the CA key signs."""

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


# What a signing job hands back: an answer, or (for _open_request) a request awaiting a decision.
_Opened = TypeVar("_Opened", bound="_Outcome | _Checked")


@dataclass(frozen=True, slots=True)
class _Query:
    """A decrypted GetCert/GetCRL envelope naming a certificate of our CA."""

    target: cms.IssuerAndSerial
    envelope: cms.Envelope
    oaep: cms.OaepParams | None


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
        random_serial: Callable[[], int] = x509.random_serial_number,
        nonce: Callable[[], bytes] = cms.random_nonce,
        crl_lifetime: timedelta = timedelta(hours=24),
        renewal: RenewalPolicy = DEFAULT_RENEWAL,
        next_ca_certs: list[x509.Certificate] | None = None,
        webhooks: WebhookClient | None = None,
    ) -> None:
        """`policy` holds what every profile shares (CRL DP, AIA); each profile adds its own
        challenge and template. `webhooks` is required when a profile uses one."""
        self.pool, self.store, self.policy = pool, store, policy
        # Under load, certificates signed while a commit is gathering join it (groupcommit.py).
        pool.on_job_end(store.batch_with(pool.working))
        self.profiles, self.webhooks = profiles, webhooks
        if webhooks is None and any(p.webhook or p.notify for p in profiles.all()):
            raise ValueError("a profile uses a webhook: pass a WebhookClient")
        self._policies = {
            p.name: replace(policy, challenge=p.static_challenge) for p in profiles.all()
        }
        # Renewals (authenticated by the signer certificate) and approved requests (whose
        # challenge was checked when they arrived) are checked without a challenge.
        self._unchallenged = replace(policy, challenge=None)
        self._holds_requests = any(p.manual_approval for p in profiles.all())
        self.renewal = renewal
        self.issuer = Issuer.of(ca_cert)
        self._clock, self._random_serial, self._nonce = clock, random_serial, nonce
        # GetNextCACert is advertised exactly while a next CA is prepared (RFC 8894 §3.5.2).
        self._caps: dict[str, bytes] = {}
        for profile in profiles.all():
            caps = tuple(c for c in profile.caps if c != "GetNextCACert")
            if next_ca_certs:
                caps += ("GetNextCACert",)
            self._caps[profile.name] = "\n".join(caps).encode()
        self._next_ca_ders = [c.public_bytes(Encoding.DER) for c in next_ca_certs or []]
        self._next_ca_body: bytes | None = None
        ders = [c.public_bytes(Encoding.DER) for c in (ca_cert, *ra_certs, *chain)]
        self.ca_cert_body = cms.certs_only(_unique(ders))
        self.ca_cert_type = CA_RA_CERT
        self.ca_cert_der = ders[0]
        self._ca_subject_der = ca_cert.subject.public_bytes()
        self._ca_key_id = self.issuer.authority_key_id.key_identifier
        self._crl_lifetime = crl_lifetime
        self._crl_lock = asyncio.Lock()
        self._crl_cache: tuple[int, bytes] | None = None

    async def next_ca_cert(self) -> bytes | None:
        """The GetNextCACert reply, signed by the current RA key once per process; None
        while no next CA is prepared."""
        if not self._next_ca_ders:
            return None
        if self._next_ca_body is None:
            signed = await self.pool.run(partial(_sign_next_ca, self._next_ca_ders))
            self._next_ca_body = signed
        return self._next_ca_body

    def ca_caps(self, profile: Profile) -> bytes:
        """The GetCACaps body of an endpoint."""
        return self._caps[profile.name]

    async def pki_operation(
        self, der: bytes, client: str = "-", profile: Profile | None = None
    ) -> bytes:
        """Answer a pkiMessage sent to `profile`'s endpoint (default: the default profile);
        MessageError means the request never verified (HTTP 400)."""
        endpoint = profile or self.profiles.default
        request = decode_pki_message(der)
        if request.message_type in (MessageType.GET_CERT, MessageType.GET_CRL):
            outcome = await self._query(request)
            self._audit(request, client, endpoint, outcome)
            return outcome.response
        if request.message_type == MessageType.CERT_POLL:
            outcome = await self._poll(request)
            self._audit(request, client, endpoint, outcome)
            return outcome.response
        refusal = None
        if request.message_type not in (MessageType.PKCS_REQ, MessageType.RENEWAL_REQ):
            refusal = "unsupported messageType"
        signer: StoredSigner | None = None
        # Only a signer that names our CA costs a store read: the hot path (a self-signed
        # PKCSReq) stays a byte comparison away from today's challenge path.
        if refusal is None and self.renewal.enabled and self._issued_here(request):
            signer = await self._stored_signer(request)
        elif refusal is None and request.message_type == MessageType.RENEWAL_REQ:
            refusal = (
                "renewal is disabled"
                if not self.renewal.enabled
                else "RenewalReq must be signed by a certificate issued here"
            )
        if refusal is not None:
            outcome = await self.pool.run(
                partial(self._failure, request, FailInfo.BAD_REQUEST, refusal)
            )
            self._audit(request, client, endpoint, outcome)
            return outcome.response
        if self._holds_requests and signer is None:
            # A re-sent PKCSReq of a held request is a poll (RFC 8894 §3.3.1.1).
            stored = await self.store.get_pending(request.transaction_id)
            if stored is not None:
                outcome = await self._answer_pending(request, stored)
                self._audit(request, client, endpoint, outcome)
                return outcome.response
        opened = await self._issue_and_store(partial(self._open_request, request, signer, endpoint))
        if isinstance(opened, _Checked):
            outcome = await self._decide(request, opened, client)
        else:
            outcome = opened
        if outcome.resent:
            outcome = await self._resend(request, outcome)
        if (
            signer is not None
            and self.renewal.revoke_replaced
            and outcome.record is not None
            and outcome.record.serial != request.signer_serial
        ):
            # After the new certificate is stored; a failure here is a 503 and the client's
            # retry (same transactionID) gets the same certificate and revokes again.
            await self._revoke_replaced(request)
        self._audit(request, client, endpoint, outcome)
        return outcome.response

    async def _issue_and_store(self, job: Callable[[KeySet], _Opened]) -> _Opened:
        """Run `job` on the pool; the certificate it issues is committed before this returns."""
        for _ in range(MAX_SERIAL_ATTEMPTS):
            try:
                return await self.pool.run_deferred(partial(self._committed, job))
            except DuplicateSerial:
                continue  # a fresh random serial on the next attempt
        raise StoreError("no unique serial number after several attempts")

    def _committed(self, job: Callable[[KeySet], _Opened], keys: KeySet) -> _Opened | Deferred:
        """Run `job`; hand the certificate it issued to the store's commit thread, which
        completes the request once the row is durable. The signing worker goes straight on
        with the next request, and the event loop sees this one only once (bench/PROFILE.md)."""
        outcome = job(keys)
        if not isinstance(outcome, _Outcome) or outcome.record is None:
            return outcome
        store, record = self.store, outcome.record

        def start(finish: Finish) -> None:
            def stored(error: BaseException | None) -> None:
                if isinstance(error, DuplicateTransaction):
                    finish(replace(outcome, resent=True), None)
                else:
                    finish(outcome if error is None else None, error)

            store.submit(record, stored)

        return Deferred(start)

    async def _decide(self, request: PkiRequest, checked: _Checked, client: str) -> _Outcome:
        """The steps between decryption and signing that need the store or a webhook:
        one-time challenges, the authorization webhook, holding for approval."""
        profile = checked.profile
        if checked.signer_serial is None and profile.challenge_mode == "one_time":
            refusal = await self._consume_challenge(request, checked)
            if refusal is not None:
                return await self._refuse(request, checked, refusal)
        elif checked.signer_serial is None and profile.challenge_mode == "webhook":
            assert profile.webhook is not None and self.webhooks is not None
            decision = await self.webhooks.authorize(
                profile.webhook, self._authorization_request(request, checked, client)
            )
            if not decision.allowed:
                return await self._refuse(request, checked, f"webhook denied: {decision.reason}")
            cert_request = with_overrides(
                checked.cert_request, sans=decision.sans, validity=decision.validity
            )
            if decision.subject is not None:
                cert_request = replace(cert_request, subject=decision.subject)
            checked = replace(checked, cert_request=cert_request)
        if checked.signer_serial is None and profile.manual_approval:
            return await self._hold(request, checked, client)
        return await self._issue_and_store(partial(self._issue_checked, request, checked))

    async def _consume_challenge(self, request: PkiRequest, checked: _Checked) -> str | None:
        """Use up the CSR's one-time challenge; None if it may enroll, else why not."""
        if checked.challenge is None:
            return "challengePassword missing"
        digest = challenge_hash(checked.challenge)
        profile = checked.profile.name
        stored = await self.store.get_challenge(digest, profile)
        if stored is None:
            return "unknown challenge"
        mismatch = binding_mismatch(
            checked.cert_request.subject.rfc4514_string(),
            describe_sans(checked.cert_request.sans),
            stored.subject_pattern,
            stored.san_pattern,
        )
        if mismatch is not None:
            return mismatch
        used_by = f"{checked.transaction_id} {_spki_sha256(checked.cert_request.public_key)}"
        if await self.store.consume_challenge(digest, self._clock(), used_by, profile):
            return None
        # The same request again (a client retrying after a lost reply or a 503): the stored
        # certificate, if any, is resent; the challenge is not used twice.
        again = await self.store.get_challenge(digest, profile)
        if again is not None and again.used_by == used_by:
            return None
        return "challenge already used or expired"

    async def _refuse(self, request: PkiRequest, checked: _Checked, reason: str) -> _Outcome:
        outcome = await self.pool.run(partial(self._failure, request, FailInfo.BAD_REQUEST, reason))
        return replace(outcome, profile=checked.profile.name, subject=checked.subject)

    def _authorization_request(
        self, request: PkiRequest, checked: _Checked, client: str
    ) -> AuthorizationRequest:
        cert_request = checked.cert_request
        return AuthorizationRequest(
            profile=checked.profile.name,
            transaction_id=request.transaction_id,
            message_type=request.message_type,
            subject=checked.subject,
            sans=describe_sans(cert_request.sans),
            key=describe_key(cert_request.public_key),
            challenge=checked.challenge.decode("utf-8", "replace")
            if checked.challenge is not None
            else None,
            client_ip=client,
        )

    # ---- manual approval: PENDING, CertPoll (GetCertInitial), the operator's decision -------

    async def _hold(self, request: PkiRequest, checked: _Checked, client: str) -> _Outcome:
        """A checked PKCSReq to wait for approval."""
        cert_request = checked.cert_request
        pending = PendingRequest(
            transaction_id=request.transaction_id,
            csr_der=checked.csr_der,
            requester_fingerprint=request.signer_fingerprint,
            requester_key_sha256=_key_sha256(request),
            requester_ip=client,
            subject=checked.subject,
            sans=describe_sans(cert_request.sans),
            key_description=describe_key(cert_request.public_key),
            created_at=self._clock(),
            profile=checked.profile.name,
        )
        stored = await self.store.add_pending(pending)
        if stored.created_at != pending.created_at:
            # The same transactionID arrived twice at once: answer as the stored one says.
            return await self._answer_pending(request, stored)
        log.info(
            "request %d (transaction %r, %s, profile %s) waits for approval",
            stored.id,
            stored.transaction_id,
            stored.subject,
            stored.profile,
        )
        outcome = await self.pool.run(partial(self._pending_reply, request))
        return replace(outcome, profile=checked.profile.name, subject=checked.subject)

    async def _poll(self, request: PkiRequest) -> _Outcome:
        """CertPoll/GetCertInitial (RFC 8894 §3.3.3), matched by transactionID."""
        stored = await self.store.get_pending(request.transaction_id)
        if stored is not None:
            return await self._answer_pending(request, stored)
        # Issued without waiting (approval = "auto"): a client that polls gets its certificate.
        issued = await self.store.get_by_transaction(request.transaction_id)
        if issued is not None and issued.public_key_sha256 == _key_sha256(request):
            return await self.pool.run(partial(self._send_issued, request, issued))
        return await self.pool.run(
            partial(self._failure, request, FailInfo.BAD_REQUEST, "unknown transactionID")
        )

    def pending_ttl(self, pending: PendingRequest) -> timedelta:
        """How long a held request waits for a decision: its profile's pending_ttl_hours."""
        return self.profiles.pending_ttl(pending.profile)

    async def _answer_pending(self, request: PkiRequest, stored: PendingRequest) -> _Outcome:
        profile = self.profiles.get(stored.profile) or self.profiles.default
        refusal = None
        if stored.requester_key_sha256 != _key_sha256(request):
            refusal = "transactionID belongs to another requester"
        elif stored.status == "rejected":
            refusal = f"request {stored.id} was rejected"
        elif stored.expired(self._clock(), profile.pending_ttl):
            refusal = f"request {stored.id} expired before approval"
        if refusal is not None:
            return await self.pool.run(
                partial(self._failure, request, FailInfo.BAD_REQUEST, refusal)
            )
        if stored.status == "pending":
            return await self.pool.run(partial(self._pending_reply, request))
        issued = await self.store.get_by_transaction(stored.transaction_id)
        if issued is not None:
            return await self.pool.run(partial(self._send_issued, request, issued))
        for _ in range(MAX_SERIAL_ATTEMPTS):
            outcome = await self.pool.run(partial(self._issue_approved, request, stored, profile))
            if outcome.record is None:
                return outcome
            try:
                await self.store.put(outcome.record)
            except DuplicateSerial:
                continue
            except DuplicateTransaction:  # another process issued it first
                outcome = await self._resend(request, outcome)
            await self.store.mark_pending_issued(stored.id)
            return outcome
        raise StoreError("no unique serial number after several attempts")

    async def pending_requests(self) -> list[PendingRequest]:
        """Requests waiting for a decision, oldest first (expired ones included)."""
        return await self.store.pending_requests()

    async def decide(self, request_id: int, approve: bool) -> tuple[PendingRequest, bool]:
        """Approve or reject a pending request; the certificate is issued at the next poll."""
        decision: Literal["approved", "rejected"] = "approved" if approve else "rejected"
        return await self.store.decide_pending(
            request_id, decision, self._clock(), self.profiles.pending_ttl
        )

    # ---- renewal: PKCSReq or RenewalReq signed by a certificate we issued ------------------

    def _issued_here(self, request: PkiRequest) -> bool:
        return names_our_ca(
            request.signer_issuer_der, request.signer_cert, self._ca_subject_der, self._ca_key_id
        )

    async def _stored_signer(self, request: PkiRequest) -> StoredSigner:
        stored = await self.store.get_by_serial(request.signer_serial)
        if stored is None:
            return StoredSigner(None, revoked=False)
        revoked = stored.status == "revoked"
        retried = False
        if revoked:
            # A retry of a renewal that already revoked this certificate (revoke_replaced):
            # it gets the certificate it was issued, not a refusal.
            existing = await self.store.get_by_transaction(
                renewal_transaction_id(request.transaction_id, request.signer_serial)
            )
            retried = (
                existing is not None
                and existing.requester_fingerprint == request.signer_fingerprint
            )
        return StoredSigner(stored.der, revoked=revoked, retried=retried)

    async def _revoke_replaced(self, request: PkiRequest) -> None:
        serial = request.signer_serial
        _, newly = await self.store.revoke(serial, "superseded", self._clock())
        if newly:
            log.info("revoked %x (superseded) after renewal %r", serial, request.transaction_id)

    async def _query(self, request: PkiRequest) -> _Outcome:
        """GetCert or GetCRL (RFC 8894 §3.3.3-4) for a certificate this CA issued."""
        opened = await self.pool.run(partial(self._open_query, request))
        if isinstance(opened, _Outcome):
            return opened
        serial = opened.target.serial
        issued = await self.store.get_by_serial(serial)
        if issued is None:
            return await self.pool.run(
                partial(self._failure, request, FailInfo.BAD_CERT_ID, f"unknown serial {serial:x}")
            )
        if request.message_type == MessageType.GET_CERT:
            content, reason = cms.certs_only([issued.der]), f"certificate {serial:x} sent"
        else:
            content, reason = cms.crls_only([await self.current_crl()]), "CRL sent"
        return await self.pool.run(partial(self._reply, request, opened, content, reason))

    # ---- the CRL: one per store, shared by every server process ---------------------------

    async def current_crl(self) -> bytes:
        """The newest CRL, signing a new one first if a revocation or its age calls for it.

        Revocations may come from another process (the CLI) and several server processes
        share the store, so the store decides: a CRL covers the revocation revision it was
        built from, and CRL numbers are unique there. A process that loses the race to publish
        a number serves the winner's CRL instead of its own.
        """
        async with self._crl_lock:
            for _ in range(MAX_CRL_ATTEMPTS):
                status = await self.store.crl_status()
                latest, now = status.latest, self._clock()
                if (
                    latest is not None
                    and latest.revision >= status.revision
                    and not crl.refresh_due(latest.this_update, latest.next_update, now)
                ):
                    der = await self._stored_crl(latest.number)
                    if der is not None:
                        return der
                    continue
                # Read after the revision: the list holds at least what that revision counts.
                revoked = await self.store.revocations()
                number = latest.number + 1 if latest is not None else 1
                info = CrlInfo(number, status.revision, now, now + self._crl_lifetime)
                der = await self.pool.run(partial(self._sign_crl, info, revoked))
                if await self.store.put_crl(info, der):
                    self._crl_cache = (number, der)
                    log.info("published CRL %d with %d revoked certificates", number, len(revoked))
                    return der
            raise StoreError("could not publish or read a current CRL")

    async def revoke(self, serial: int, reason: str) -> tuple[Revocation, bool]:
        """Revoke by serial (UnknownCertificate if not issued here), then sign the next CRL.

        The same store write as `hsmscep revoke`; a failure to sign the CRL right away is
        logged, not raised: the revocation stands and the next CRL request signs it.
        """
        revocation, changed = await self.store.revoke(serial, reason, self._clock())
        if changed:
            try:
                await self.current_crl()
            except (HsmError, StoreError) as exc:
                log.warning("CRL after revoking %x not signed yet: %s", serial, exc)
        return revocation, changed

    async def _stored_crl(self, number: int) -> bytes | None:
        if self._crl_cache is not None and self._crl_cache[0] == number:
            return self._crl_cache[1]
        der = await self.store.get_crl(number)
        if der is not None:
            self._crl_cache = (number, der)
        return der

    @asynccontextmanager
    async def crl_refresher(self, every: float = CRL_CHECK_SECONDS) -> AsyncIterator[None]:
        """Keep the CRL current while the context runs: after revocations and before expiry."""
        task = asyncio.create_task(self._refresh_crl(every), name="hsmscep-crl")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait([task])

    async def _refresh_crl(self, every: float) -> None:
        while True:
            try:
                await self.current_crl()
            except (HsmError, StoreError) as exc:
                log.warning("CRL refresh failed, retrying in %.0f s: %s", every, exc)
            await asyncio.sleep(every)

    async def _resend(self, request: PkiRequest, fresh: _Outcome) -> _Outcome:
        # RFC 8894 §3.3.1.1 / interop-quirks #10: a retried PKCSReq gets the certificate it
        # already has; the freshly signed one is discarded before anyone saw it.
        assert fresh.record is not None and fresh.envelope is not None
        existing = await self.store.get_by_transaction(fresh.record.transaction_id)
        if existing is None or existing.public_key_sha256 != fresh.record.public_key_sha256:
            return await self.pool.run(
                partial(self._failure, request, FailInfo.BAD_REQUEST, "transactionID already used")
            )
        return await self.pool.run(partial(self._reissue, request, existing, fresh))

    # ---- jobs: these run on a signing worker thread with that thread's keys ------------

    def _open_request(
        self, request: PkiRequest, signer: StoredSigner | None, endpoint: Profile, keys: KeySet
    ) -> _Outcome | _Checked:
        """Decrypt and check a PKCSReq or RenewalReq against its profile, and issue at once
        unless the store, a webhook or an operator must decide first (then: _Checked).

        `signer` (the stored signer certificate) set means a renewal."""
        csr_subject: x509.Name | None = None  # for the refusal's audit line
        profile = endpoint
        try:
            if not isinstance(request.signer_cert.public_key(), rsa.RSAPublicKey):
                raise Rejected(FailInfo.BAD_ALG, "the reply can only be encrypted to an RSA key")
            now = self._clock()
            if signer is not None:
                check_signer(
                    request.signer_cert,
                    signer,
                    ca_cert=self.issuer.certificate,
                    now=now,
                    policy=self.renewal,
                )
            envelope = decode_envelope(request.content)
            cek, oaep = _decrypt_key(envelope, keys)
            csr_der = envelope.open(cek)
            csr = load_csr(csr_der)
            csr_subject = csr.subject
            profile = self.profiles.for_template(endpoint, ms_template_name(csr))
            if signer is None:
                cert_request = apply_template(
                    check_csr(csr, self._policies[profile.name]), profile.template
                )
                transaction_id = request.transaction_id
            else:
                # A renewal is authenticated by the signer certificate, not by the challenge,
                # and keeps the old subject and SANs: of the template, only the key rules apply.
                checked_csr = check_csr(csr, self._unchallenged)
                check_key(checked_csr.public_key, profile.template)
                cert_request = renewed_request(request.signer_cert, checked_csr, self.renewal)
                transaction_id = renewal_transaction_id(
                    request.transaction_id, request.signer_serial
                )
            checked = _Checked(
                profile=profile,
                cert_request=cert_request,
                csr_der=csr_der,
                envelope=envelope,
                oaep=oaep,
                transaction_id=transaction_id,
                challenge=challenge_password(csr)
                if profile.challenge_mode == "one_time" or profile.webhook is not None
                else None,
                signer_serial=request.signer_serial if signer is not None else None,
            )
            if signer is None and (profile.authorizes_later or profile.manual_approval):
                return checked
            outcome = self._issue_checked(request, checked, keys)
        except HsmError:
            raise  # the HSM, not the request: HTTP 503, the client retries
        except Exception as exc:
            subject = csr_subject.rfc4514_string() if csr_subject is not None else None
            return replace(self._refusal(request, exc, keys), profile=profile.name, subject=subject)
        return outcome

    def _issue_checked(self, request: PkiRequest, checked: _Checked, keys: KeySet) -> _Outcome:
        """Sign the certificate of a checked request and the SUCCESS CertRep carrying it."""
        reason = "issued" if checked.signer_serial is None else f"renewed {checked.signer_serial:x}"
        response, record = self._issue(
            request,
            checked.cert_request,
            checked.profile,
            checked.envelope,
            checked.oaep,
            self._clock(),
            checked.transaction_id,
            request.signer_fingerprint,
            keys,
        )
        return _Outcome(
            response,
            record,
            reason,
            checked.envelope,
            checked.oaep,
            profile=checked.profile.name,
            subject=record.subject,
        )

    def _issue(
        self,
        request: PkiRequest,
        cert_request: CertRequest,
        profile: Profile,
        envelope: cms.Envelope,
        oaep: cms.OaepParams | None,
        now: datetime,
        transaction_id: str,
        requester_fingerprint: str,
        keys: KeySet,
    ) -> tuple[bytes, IssuedCert]:
        """Sign the certificate with the CA key and the SUCCESS CertRep carrying it."""
        cert = build_certificate(
            cert_request,
            issuer=self.issuer,
            issuer_key=keys.ca_key,
            serial=self._random_serial(),
            now=now,
            policy=self.policy,
            template=profile.template,
        )
        cert_der = cert.public_bytes(Encoding.DER)
        response = self._success(request, [cert_der], envelope, oaep, keys)
        record = IssuedCert(
            serial=cert.serial_number,
            subject=cert_request.subject.rfc4514_string(),  # the builder's, not parsed back
            sans=describe_sans(cert_request.sans),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            transaction_id=transaction_id,
            requester_fingerprint=requester_fingerprint,
            public_key_sha256=_spki_sha256(cert_request.public_key),
            der=cert_der,
            issued_at=now,
        )
        return response, record

    def _success(
        self,
        request: PkiRequest,
        certs_der: list[bytes],
        envelope: cms.Envelope,
        oaep: cms.OaepParams | None,
        keys: KeySet,
    ) -> bytes:
        """A SUCCESS CertRep with `certs_der` sealed to the requester in its own cipher."""
        sealed = seal_certificates(certs_der, request, _reply_cipher(envelope), oaep)
        return build_cert_rep(
            request,
            keys.response_signer,
            status=PkiStatus.SUCCESS,
            envelope=sealed,
            sender_nonce=self._nonce(),
        )

    def _pending_reply(self, request: PkiRequest, keys: KeySet) -> _Outcome:
        response = build_cert_rep(
            request, keys.response_signer, status=PkiStatus.PENDING, sender_nonce=self._nonce()
        )
        return _Outcome(response, None, "pending approval", pending=True)

    def _issue_approved(
        self, request: PkiRequest, stored: PendingRequest, profile: Profile, keys: KeySet
    ) -> _Outcome:
        """Issue an approved request's stored CSR, sealed to the polling signer."""
        try:
            envelope = decode_envelope(request.content)
            _, oaep = _decrypt_key(envelope, keys)  # the poll must be encrypted to us too
            now = self._clock()
            # The challenge was checked when the request arrived; it may have changed since.
            cert_request = apply_template(
                check_csr(load_csr(stored.csr_der), self._unchallenged), profile.template
            )
            response, record = self._issue(
                request,
                cert_request,
                profile,
                envelope,
                oaep,
                now,
                stored.transaction_id,
                stored.requester_fingerprint,
                keys,
            )
        except HsmError:
            raise
        except Exception as exc:
            return self._refusal(request, exc, keys)
        return _Outcome(
            response,
            record,
            f"issued after approval of request {stored.id}",
            envelope,
            oaep,
            profile=profile.name,
            subject=record.subject,
        )

    def _send_issued(self, request: PkiRequest, issued: IssuedCert, keys: KeySet) -> _Outcome:
        """The certificate already issued for this transactionID, sealed to the poller."""
        try:
            envelope = decode_envelope(request.content)
            _, oaep = _decrypt_key(envelope, keys)
            response = self._success(request, [issued.der], envelope, oaep, keys)
        except HsmError:
            raise
        except Exception as exc:
            return self._refusal(request, exc, keys)
        return _Outcome(response, issued, "resent")

    def _open_query(self, request: PkiRequest, keys: KeySet) -> _Query | _Outcome:
        try:
            if not isinstance(request.signer_cert.public_key(), rsa.RSAPublicKey):
                raise Rejected(FailInfo.BAD_ALG, "the reply can only be encrypted to an RSA key")
            envelope = decode_envelope(request.content)
            cek, oaep = _decrypt_key(envelope, keys)
            target = cms.decode_issuer_and_serial(envelope.open(cek))
            if not target.issued_by(self._ca_subject_der):
                raise Rejected(FailInfo.BAD_CERT_ID, "issuer is not this CA")
        except HsmError:
            raise
        except Exception as exc:
            return self._refusal(request, exc, keys)
        return _Query(target, envelope, oaep)

    def _reply(
        self, request: PkiRequest, query: _Query, content: bytes, reason: str, keys: KeySet
    ) -> _Outcome:
        sealed = seal_reply(content, request, _reply_cipher(query.envelope), query.oaep)
        response = build_cert_rep(
            request,
            keys.response_signer,
            status=PkiStatus.SUCCESS,
            envelope=sealed,
            sender_nonce=self._nonce(),
        )
        return _Outcome(response, None, reason)

    def _sign_crl(self, info: CrlInfo, revoked: list[Revocation], keys: KeySet) -> bytes:
        entries = [
            crl.RevokedEntry(
                r.serial, r.revoked_at, crl.REASONS.get(r.reason, x509.ReasonFlags.unspecified)
            )
            for r in revoked
        ]
        signed = crl.build_crl(
            issuer=self.issuer,
            issuer_key=keys.ca_key,
            number=info.number,
            revoked=entries,
            this_update=info.this_update,
            next_update=info.next_update,
        )
        return signed.public_bytes(Encoding.DER)

    def _refusal(self, request: PkiRequest, exc: Exception, keys: KeySet) -> _Outcome:
        """The signed FAILURE for an error raised while handling a verified request."""
        if isinstance(exc, UnsupportedAlgorithm):
            return self._failure(request, FailInfo.BAD_ALG, str(exc), keys)
        if isinstance(exc, MessageError):
            return self._failure(request, FailInfo.BAD_MESSAGE_CHECK, str(exc), keys)
        if isinstance(exc, Rejected):
            return self._failure(request, exc.fail_info, exc.reason, keys)
        # A bug must still be answered the way clients understand (interop-quirks #9).
        log.error("unexpected error for transaction %r", request.transaction_id, exc_info=exc)
        return self._failure(request, FailInfo.BAD_REQUEST, "internal error", keys)

    def _reissue(
        self, request: PkiRequest, existing: IssuedCert, fresh: _Outcome, keys: KeySet
    ) -> _Outcome:
        assert fresh.envelope is not None
        response = self._success(request, [existing.der], fresh.envelope, fresh.oaep, keys)
        return _Outcome(response, existing, "resent")

    def _failure(
        self, request: PkiRequest, fail_info: FailInfo, reason: str, keys: KeySet
    ) -> _Outcome:
        response = build_cert_rep(
            request,
            keys.response_signer,
            status=PkiStatus.FAILURE,
            fail_info=fail_info,
            sender_nonce=self._nonce(),
        )
        return _Outcome(response, None, f"{fail_info.name}: {reason}", fail_info=fail_info)

    def _audit(
        self, request: PkiRequest, client: str, endpoint: Profile, outcome: _Outcome
    ) -> None:
        """One JSON line per decision (never the challenge), and the profile's notification."""
        profile = self.profiles.get(outcome.profile or endpoint.name) or endpoint
        record = outcome.record
        if outcome.fail_info is not None:
            decision = "denied"
        elif outcome.pending:
            decision = "pending"
        elif record is not None:
            decision = "issued"
        else:
            decision = "answered"
        entry: dict[str, object] = {
            "event": "pki_operation",
            "profile": profile.name,
            "message_type": request.message_type,
            "transaction_id": request.transaction_id,
            "client": client,
            "subject": record.subject if record is not None else outcome.subject,
            "decision": decision,
            "outcome": outcome.reason,
        }
        if record is not None:
            entry["serial"] = f"{record.serial:x}"
        if audit.isEnabledFor(logging.INFO):
            audit.info(json.dumps(entry, ensure_ascii=False))
        if profile.notify is not None and decision in ("issued", "denied"):
            assert self.webhooks is not None
            event = entry | {"event": decision, "time": self._clock().isoformat()}
            self.webhooks.notify(profile.notify, event)


def _sign_next_ca(certs_der: list[bytes], keys: KeySet) -> bytes:
    return sign_next_ca_certs(certs_der, keys.response_signer)


def _decrypt_key(envelope: cms.Envelope, keys: KeySet) -> tuple[bytes, cms.OaepParams | None]:
    """Decrypt the content-encryption key with the RA key the envelope names."""
    for transport in envelope.recipients:
        for cert_id, key in keys.decrypt_keys:
            if transport.recipient.matches(cert_id):
                oaep = transport.oaep
                pad = oaep.padding() if oaep is not None else padding.PKCS1v15()
                return key.decrypt(transport.encrypted_key, pad), oaep
    raise MessageError("the envelope is not encrypted to any of our RA certificates")


def _spki_sha256(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    return hashlib.sha256(
        key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    ).hexdigest()


def _key_sha256(request: PkiRequest) -> str:
    """SHA-256 of the signer's SubjectPublicKeyInfo: who may poll for a transaction."""
    spki = request.signer_cert.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def describe_key(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """The key column of the pending list: "RSA 2048", "EC secp256r1"."""
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return f"EC {key.curve.name}"


def _reply_cipher(envelope: cms.Envelope) -> ContentCipher:
    # Mirror the client's cipher (interop-quirks #5), except that single DES is never sent.
    reply = envelope.cipher.reply_with
    return CIPHERS_BY_NAME[reply] if reply else envelope.cipher


def _unique(items: list[bytes]) -> list[bytes]:
    return list(dict.fromkeys(items))


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
