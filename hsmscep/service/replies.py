"""The worker-side jobs that build CertReps: success, pending, failure, resend (RFC 8894 §3.3.2).

Each job runs on a signing worker thread with that thread's keys and returns an Outcome: the
signed response plus what the audit line and the store need. Nothing here awaits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmscep.errors import HsmError, MessageError, Rejected
from hsmscep.policy.issuance import IssuancePolicy, Issuer, describe_sans, sign_certificate
from hsmscep.policy.request import CertRequest
from hsmscep.policy.template import CertTemplate
from hsmscep.protocol import cms
from hsmscep.protocol.algorithms import CIPHERS_BY_NAME, ContentCipher
from hsmscep.protocol.certrep import (
    ResponseSigner,
    build_cert_rep,
    seal_certificates,
    seal_reply,
)
from hsmscep.protocol.codes import FailInfo, PkiStatus
from hsmscep.protocol.message import PkiRequest
from hsmscep.service.ports import KeySet
from hsmscep.service.refusal import rejection
from hsmscep.store.records import IssuedCert


@dataclass(frozen=True, slots=True)
class Outcome:
    """A signed answer and what the audit line (and, for a certificate, the store) needs."""

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


class Replies:
    """Builds and signs every CertRep the service sends; its methods are signing-worker jobs."""

    def __init__(
        self,
        *,
        issuer: Issuer,
        policy: IssuancePolicy,
        clock: Callable[[], datetime],
        new_serial: Callable[[datetime], int],
        nonce: Callable[[], bytes],
    ) -> None:
        self.issuer, self.policy = issuer, policy
        self.clock, self._new_serial, self._nonce = clock, new_serial, nonce

    def issue(
        self,
        request: PkiRequest,
        cert_request: CertRequest,
        template: CertTemplate,
        envelope: cms.Envelope,
        oaep: cms.OaepParams | None,
        transaction_id: str,
        requester_fingerprint: str,
        keys: KeySet,
    ) -> tuple[bytes, IssuedCert]:
        """Sign the certificate with the CA key and the SUCCESS CertRep carrying it; the
        reply is sealed in the cipher of the request's `envelope`."""
        now = self.clock()
        serial = self._new_serial(now)  # its time part is the notBefore's
        cert = sign_certificate(
            cert_request,
            issuer=self.issuer,
            issuer_key=keys.ca_key,
            serial=serial,
            now=now,
            policy=self.policy,
            template=template,
        )
        response = self.success(request, [cert.der], envelope, oaep, keys)
        # From what was encoded, not parsed back (tests/test_certificate_encoding.py).
        record = IssuedCert(
            serial=serial,
            subject=cert_request.subject_text(),
            sans=describe_sans(cert_request.sans),
            not_before=cert.not_before,
            not_after=cert.not_after,
            transaction_id=transaction_id,
            requester_fingerprint=requester_fingerprint,
            public_key_sha256=spki_sha256(cert_request.public_key),
            der=cert.der,
            issued_at=now,
        )
        return response, record

    def success(
        self,
        request: PkiRequest,
        certs_der: list[bytes],
        envelope: cms.Envelope,
        oaep: cms.OaepParams | None,
        keys: KeySet,
    ) -> bytes:
        """A SUCCESS CertRep with `certs_der` sealed to the requester in its own cipher."""
        sealed = seal_certificates(certs_der, request, reply_cipher(envelope), oaep)
        return build_cert_rep(
            request,
            self.signer(request, keys, envelope),
            status=PkiStatus.SUCCESS,
            envelope=sealed,
            sender_nonce=self._nonce(),
        )

    def content(
        self,
        request: PkiRequest,
        envelope: cms.Envelope,
        oaep: cms.OaepParams | None,
        content: bytes,
        reason: str,
        keys: KeySet,
    ) -> Outcome:
        """A SUCCESS CertRep carrying `content` (a GetCert or GetCRL answer)."""
        sealed = seal_reply(content, request, reply_cipher(envelope), oaep)
        response = build_cert_rep(
            request,
            self.signer(request, keys, envelope),
            status=PkiStatus.SUCCESS,
            envelope=sealed,
            sender_nonce=self._nonce(),
        )
        return Outcome(response, None, reason)

    def pending(self, request: PkiRequest, keys: KeySet) -> Outcome:
        """The PENDING CertRep of a request held for approval."""
        response = build_cert_rep(
            request,
            self.signer(request, keys),
            status=PkiStatus.PENDING,
            sender_nonce=self._nonce(),
        )
        return Outcome(response, None, "pending approval", pending=True)

    def send_issued(self, request: PkiRequest, issued: IssuedCert, keys: KeySet) -> Outcome:
        """The certificate already issued for this transactionID, sealed to the poller."""
        try:
            envelope = cms.decode_envelope(request.content)
            _, oaep = decrypt_key(envelope, keys)  # the poll must be encrypted to us too
            response = self.success(request, [issued.der], envelope, oaep, keys)
        except Exception as exc:
            return self.refused(request, exc, keys)
        return Outcome(response, issued, "resent")

    def reissue(
        self, request: PkiRequest, existing: IssuedCert, fresh: Outcome, keys: KeySet
    ) -> Outcome:
        """The stored certificate in place of `fresh`, sealed the way `fresh` was."""
        assert fresh.envelope is not None
        response = self.success(request, [existing.der], fresh.envelope, fresh.oaep, keys)
        return Outcome(response, existing, "resent")

    def refused(self, request: PkiRequest, error: Exception, keys: KeySet) -> Outcome:
        """The signed FAILURE for an error raised while handling a verified request.

        HsmError is re-raised: the HSM failed, not the request (HTTP 503, the client retries).
        """
        if isinstance(error, HsmError):
            raise error
        return self.failure(request, rejection(error, request.transaction_id), keys)

    def failure(self, request: PkiRequest, refusal: Rejected, keys: KeySet) -> Outcome:
        """The FAILURE CertRep of a refusal; its audit text is "<failInfo name>: <reason>"."""
        fail_info = refusal.fail_info
        response = build_cert_rep(
            request,
            self.signer(request, keys),
            status=PkiStatus.FAILURE,
            fail_info=fail_info,
            sender_nonce=self._nonce(),
        )
        return Outcome(response, None, f"{fail_info.name}: {refusal.reason}", fail_info=fail_info)

    def signer(
        self, request: PkiRequest, keys: KeySet, envelope: cms.Envelope | None = None
    ) -> ResponseSigner:
        """The RA that signs the answer: the one the request was encrypted to while its
        certificate is valid (a client that cached GetCACert before a rollover verifies the
        reply with that RA), else the current one. No rollover: no work."""
        previous = keys.previous_signers
        if not previous:
            return keys.response_signer
        if envelope is None:
            try:
                envelope = cms.decode_envelope(request.content)
            except MessageError:
                return keys.response_signer
        current = keys.decrypt_keys[0][0]
        recipients = [transport.recipient for transport in envelope.recipients]
        if any(r.matches(current) for r in recipients):
            return keys.response_signer
        now = self.clock()
        for cert_id, signer in previous:
            valid = signer.not_after is None or now <= signer.not_after
            if valid and any(r.matches(cert_id) for r in recipients):
                return signer
        return keys.response_signer


def decrypt_key(envelope: cms.Envelope, keys: KeySet) -> tuple[bytes, cms.OaepParams | None]:
    """Decrypt the content-encryption key with the RA key the envelope names."""
    for transport in envelope.recipients:
        for cert_id, key in keys.decrypt_keys:
            if transport.recipient.matches(cert_id):
                oaep = transport.oaep
                pad = oaep.padding() if oaep is not None else padding.PKCS1v15()
                return key.decrypt(transport.encrypted_key, pad), oaep
    raise MessageError("the envelope is not encrypted to any of our RA certificates")


def reply_cipher(envelope: cms.Envelope) -> ContentCipher:
    # Mirror the client's cipher (interop-quirks #5), except that single DES is never sent.
    reply = envelope.cipher.reply_with
    return CIPHERS_BY_NAME[reply] if reply else envelope.cipher


def spki_sha256(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """SHA-256 (hex) of a public key's SubjectPublicKeyInfo."""
    return hashlib.sha256(
        key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    ).hexdigest()


def requester_key_sha256(request: PkiRequest) -> str:
    """SHA-256 of the signer's SubjectPublicKeyInfo: who may poll for a transaction."""
    spki = request.signer_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def describe_key(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """The key column of the pending list: "RSA 2048", "EC secp256r1"."""
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return f"EC {key.curve.name}"
