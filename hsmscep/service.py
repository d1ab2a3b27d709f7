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
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmscep import cms, crl
from hsmscep.algorithms import CIPHERS_BY_NAME, ContentCipher
from hsmscep.certrep import build_cert_rep, seal_certificates, seal_reply, sign_next_ca_certs
from hsmscep.cms import decode_envelope
from hsmscep.errors import (
    DuplicateSerial,
    DuplicateTransaction,
    HsmError,
    MessageError,
    Rejected,
    StoreError,
    UnsupportedAlgorithm,
)
from hsmscep.issuance import (
    CertRequest,
    IssuancePolicy,
    Issuer,
    build_certificate,
    check_csr,
    describe_sans,
    load_csr,
)
from hsmscep.keyring import Keyring
from hsmscep.message import FailInfo, MessageType, PkiRequest, PkiStatus, decode_pki_message
from hsmscep.pool import SigningPool
from hsmscep.renewal import (
    DEFAULT_RENEWAL,
    RenewalPolicy,
    StoredSigner,
    check_signer,
    names_our_ca,
    renewal_transaction_id,
    renewed_request,
)
from hsmscep.store import CertStore, CrlInfo, IssuedCert, PendingRequest, Revocation

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
        pool: SigningPool[Keyring],
        store: CertStore,
        ca_cert: x509.Certificate,
        ra_certs: list[x509.Certificate],
        chain: list[x509.Certificate],
        policy: IssuancePolicy,
        caps: tuple[str, ...],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        random_serial: Callable[[], int] = x509.random_serial_number,
        nonce: Callable[[], bytes] = cms.random_nonce,
        crl_lifetime: timedelta = timedelta(hours=24),
        renewal: RenewalPolicy = DEFAULT_RENEWAL,
        manual_approval: bool = False,
        pending_ttl: timedelta = timedelta(hours=72),
        next_ca_certs: list[x509.Certificate] | None = None,
    ) -> None:
        self.pool, self.store, self.policy = pool, store, policy
        self.renewal = renewal
        # A renewal is authenticated by the signer certificate, not by the challenge.
        self._renewal_csr_policy = replace(policy, challenge=None)
        self.issuer = Issuer.of(ca_cert)
        self._clock, self._random_serial, self._nonce = clock, random_serial, nonce
        # GetNextCACert is advertised exactly while a next CA is prepared (RFC 8894 §3.5.2).
        caps = tuple(c for c in caps if c != "GetNextCACert")
        if next_ca_certs:
            caps += ("GetNextCACert",)
        self.ca_caps = "\n".join(caps).encode()
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
        self.manual_approval, self.pending_ttl = manual_approval, pending_ttl
        # The challenge was checked when the request arrived; it may have changed since.
        self._approved_csr_policy = replace(policy, challenge=None)

    async def next_ca_cert(self) -> bytes | None:
        """The GetNextCACert reply, signed by the current RA key once per process; None
        while no next CA is prepared."""
        if not self._next_ca_ders:
            return None
        if self._next_ca_body is None:
            signed = await self.pool.run(partial(_sign_next_ca, self._next_ca_ders))
            self._next_ca_body = signed
        return self._next_ca_body

    async def pki_operation(self, der: bytes, client: str = "-") -> bytes:
        """Answer a pkiMessage; MessageError means the request never verified (HTTP 400)."""
        request = decode_pki_message(der)
        if request.message_type in (MessageType.GET_CERT, MessageType.GET_CRL):
            outcome = await self._query(request)
            self._audit(request, client, outcome, None)
            return outcome.response
        if request.message_type == MessageType.CERT_POLL:
            outcome = await self._poll(request)
            self._audit(request, client, outcome, outcome.record)
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
            self._audit(request, client, outcome, None)
            return outcome.response
        if self.manual_approval and signer is None:
            outcome = await self._hold(request, client)
            self._audit(request, client, outcome, outcome.record)
            return outcome.response
        for _ in range(MAX_SERIAL_ATTEMPTS):
            outcome = await self.pool.run(partial(self._enroll, request, signer))
            if outcome.record is None:
                self._audit(request, client, outcome, None)
                return outcome.response
            try:
                await self.store.put(outcome.record)
            except DuplicateSerial:
                continue
            except DuplicateTransaction:
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
            self._audit(request, client, outcome, outcome.record)
            return outcome.response
        raise StoreError("no unique serial number after several attempts")

    # ---- manual approval: PENDING, CertPoll (GetCertInitial), the operator's decision -------

    async def _hold(self, request: PkiRequest, client: str) -> _Outcome:
        """A PKCSReq to wait for approval; a re-sent one (same transactionID) is a poll."""
        stored = await self.store.get_pending(request.transaction_id)
        if stored is not None:
            return await self._answer_pending(request, stored)
        checked = await self.pool.run(partial(self._check_for_approval, request, client))
        if isinstance(checked, _Outcome):
            return checked
        pending, outcome = checked
        stored = await self.store.add_pending(pending)
        if stored.created_at != pending.created_at:
            # The same transactionID arrived twice at once: answer as the stored one says.
            return await self._answer_pending(request, stored)
        log.info(
            "request %d (transaction %r, %s) waits for approval",
            stored.id,
            stored.transaction_id,
            stored.subject,
        )
        return outcome

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

    async def _answer_pending(self, request: PkiRequest, stored: PendingRequest) -> _Outcome:
        refusal = None
        if stored.requester_key_sha256 != _key_sha256(request):
            refusal = "transactionID belongs to another requester"
        elif stored.status == "rejected":
            refusal = f"request {stored.id} was rejected"
        elif stored.expired(self._clock(), self.pending_ttl):
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
            outcome = await self.pool.run(partial(self._issue_approved, request, stored))
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
            request_id, decision, self._clock(), self.pending_ttl
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

    def _enroll(self, request: PkiRequest, signer: StoredSigner | None, keys: Keyring) -> _Outcome:
        """Issue for a PKCSReq, or renew when `signer` (the stored signer certificate) is set."""
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
            csr = load_csr(envelope.open(cek))
            if signer is None:
                cert_request = check_csr(csr, self.policy)
            else:
                cert_request = renewed_request(
                    request.signer_cert, check_csr(csr, self._renewal_csr_policy), self.renewal
                )
            transaction_id = (
                request.transaction_id
                if signer is None
                else renewal_transaction_id(request.transaction_id, request.signer_serial)
            )
            response, record = self._issue(
                request,
                cert_request,
                envelope,
                oaep,
                now,
                transaction_id,
                request.signer_fingerprint,
                keys,
            )
        except HsmError:
            raise  # the HSM, not the request: HTTP 503, the client retries
        except Exception as exc:
            return self._refusal(request, exc, keys)
        reason = "issued" if signer is None else f"renewed {request.signer_serial:x}"
        return _Outcome(response, record, reason, envelope, oaep)

    def _issue(
        self,
        request: PkiRequest,
        cert_request: CertRequest,
        envelope: cms.Envelope,
        oaep: cms.OaepParams | None,
        now: datetime,
        transaction_id: str,
        requester_fingerprint: str,
        keys: Keyring,
    ) -> tuple[bytes, IssuedCert]:
        """Sign the certificate with the CA key and the SUCCESS CertRep carrying it."""
        cert = build_certificate(
            cert_request,
            issuer=self.issuer,
            issuer_key=keys.ca_key,
            serial=self._random_serial(),
            now=now,
            policy=self.policy,
        )
        cert_der = cert.public_bytes(Encoding.DER)
        response = self._success(request, [cert_der], envelope, oaep, keys)
        spki = cert_request.public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        record = IssuedCert(
            serial=cert.serial_number,
            subject=cert.subject.rfc4514_string(),
            sans=describe_sans(cert_request.sans),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            transaction_id=transaction_id,
            requester_fingerprint=requester_fingerprint,
            public_key_sha256=hashlib.sha256(spki).hexdigest(),
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
        keys: Keyring,
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

    def _check_for_approval(
        self, request: PkiRequest, client: str, keys: Keyring
    ) -> tuple[PendingRequest, _Outcome] | _Outcome:
        """Decrypt and check a PKCSReq as for issuance, then answer PENDING instead."""
        try:
            if not isinstance(request.signer_cert.public_key(), rsa.RSAPublicKey):
                raise Rejected(FailInfo.BAD_ALG, "the reply can only be encrypted to an RSA key")
            envelope = decode_envelope(request.content)
            cek, _ = _decrypt_key(envelope, keys)
            csr_der = envelope.open(cek)
            cert_request = check_csr(load_csr(csr_der), self.policy)
            pending = PendingRequest(
                transaction_id=request.transaction_id,
                csr_der=csr_der,
                requester_fingerprint=request.signer_fingerprint,
                requester_key_sha256=_key_sha256(request),
                requester_ip=client,
                subject=cert_request.subject.rfc4514_string(),
                sans=describe_sans(cert_request.sans),
                key_description=describe_key(cert_request.public_key),
                created_at=self._clock(),
            )
        except HsmError:
            raise
        except Exception as exc:
            return self._refusal(request, exc, keys)
        return pending, self._pending_reply(request, keys)

    def _pending_reply(self, request: PkiRequest, keys: Keyring) -> _Outcome:
        response = build_cert_rep(
            request, keys.response_signer, status=PkiStatus.PENDING, sender_nonce=self._nonce()
        )
        return _Outcome(response, None, "pending approval")

    def _issue_approved(
        self, request: PkiRequest, stored: PendingRequest, keys: Keyring
    ) -> _Outcome:
        """Issue an approved request's stored CSR, sealed to the polling signer."""
        try:
            envelope = decode_envelope(request.content)
            _, oaep = _decrypt_key(envelope, keys)  # the poll must be encrypted to us too
            now = self._clock()
            cert_request = check_csr(load_csr(stored.csr_der), self._approved_csr_policy)
            response, record = self._issue(
                request,
                cert_request,
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
            response, record, f"issued after approval of request {stored.id}", envelope, oaep
        )

    def _send_issued(self, request: PkiRequest, issued: IssuedCert, keys: Keyring) -> _Outcome:
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

    def _open_query(self, request: PkiRequest, keys: Keyring) -> _Query | _Outcome:
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
        self, request: PkiRequest, query: _Query, content: bytes, reason: str, keys: Keyring
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

    def _sign_crl(self, info: CrlInfo, revoked: list[Revocation], keys: Keyring) -> bytes:
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

    def _refusal(self, request: PkiRequest, exc: Exception, keys: Keyring) -> _Outcome:
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
        self, request: PkiRequest, existing: IssuedCert, fresh: _Outcome, keys: Keyring
    ) -> _Outcome:
        assert fresh.envelope is not None
        response = self._success(request, [existing.der], fresh.envelope, fresh.oaep, keys)
        return _Outcome(response, existing, "resent")

    def _failure(
        self, request: PkiRequest, fail_info: FailInfo, reason: str, keys: Keyring
    ) -> _Outcome:
        response = build_cert_rep(
            request,
            keys.response_signer,
            status=PkiStatus.FAILURE,
            fail_info=fail_info,
            sender_nonce=self._nonce(),
        )
        return _Outcome(response, None, f"{fail_info.name}: {reason}")

    def _audit(
        self, request: PkiRequest, client: str, outcome: _Outcome, record: IssuedCert | None
    ) -> None:
        if not audit.isEnabledFor(logging.INFO):
            return
        entry = {
            "event": "pki_operation",
            "message_type": request.message_type,
            "transaction_id": request.transaction_id,
            "client": client,
            "outcome": outcome.reason,
        }
        if record is not None:
            entry |= {"serial": f"{record.serial:x}", "subject": record.subject}
        audit.info(json.dumps(entry, ensure_ascii=False))


def _sign_next_ca(certs_der: list[bytes], keys: Keyring) -> bytes:
    return sign_next_ca_certs(certs_der, keys.response_signer)


def _decrypt_key(envelope: cms.Envelope, keys: Keyring) -> tuple[bytes, cms.OaepParams | None]:
    """Decrypt the content-encryption key with the RA key the envelope names."""
    for transport in envelope.recipients:
        for cert_id, key in keys.decrypt_keys:
            if transport.recipient.matches(cert_id):
                oaep = transport.oaep
                pad = oaep.padding() if oaep is not None else padding.PKCS1v15()
                return key.decrypt(transport.encrypted_key, pad), oaep
    raise MessageError("the envelope is not encrypted to any of our RA certificates")


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
    challenge: bytes | None, validity_days: int, base_url: str | None = None
) -> IssuancePolicy:
    """The issuance policy; with a public base URL, certificates point to the CRL and CA."""
    if base_url is None:
        return IssuancePolicy(challenge=challenge, validity=timedelta(days=validity_days))
    urls = crl.PublicUrls.of(base_url)
    return IssuancePolicy(
        challenge=challenge,
        validity=timedelta(days=validity_days),
        crl_distribution_points=urls.crl_distribution_points(),
        authority_information_access=urls.authority_information_access(),
    )
