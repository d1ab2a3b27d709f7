"""The SCEP operations, tying the pure core to the signing pool and the store.

The only module that awaits both. A PKIOperation costs one trip to a signing worker, which
decrypts, checks, issues and signs the CertRep in one go, and one group-committed store write
that completes before the response is returned. Everything a request needs that does not
change (GetCACert/GetCACaps bodies, parsed certificates) is built in the constructor.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmscep import cms
from hsmscep.algorithms import CIPHERS_BY_NAME, ContentCipher
from hsmscep.certrep import build_cert_rep, seal_certificates
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
from hsmscep.store import CertStore, IssuedCert

log = logging.getLogger(__name__)
audit = logging.getLogger("hsmscep.audit")

CA_RA_CERT = "application/x-x509-ca-ra-cert"
CA_CERT = "application/x-x509-ca-cert"
MAX_SERIAL_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class _Outcome:
    response: bytes
    record: IssuedCert | None
    reason: str
    envelope: cms.Envelope | None = None
    oaep: cms.OaepParams | None = None


class ScepService:
    """GetCACaps, GetCACert and PKIOperation over an HSM signing pool and a certificate store."""

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
    ) -> None:
        self.pool, self.store, self.policy = pool, store, policy
        self.issuer = Issuer.of(ca_cert)
        self._clock, self._random_serial, self._nonce = clock, random_serial, nonce
        self.ca_caps = "\n".join(caps).encode()
        ders = [c.public_bytes(Encoding.DER) for c in (ca_cert, *ra_certs, *chain)]
        self.ca_cert_body = cms.certs_only(_unique(ders))
        self.ca_cert_type = CA_RA_CERT

    async def pki_operation(self, der: bytes, client: str = "-") -> bytes:
        """Answer a pkiMessage; MessageError means the request never verified (HTTP 400)."""
        request = decode_pki_message(der)
        if request.message_type != MessageType.PKCS_REQ:
            outcome = await self.pool.run(
                partial(self._failure, request, FailInfo.BAD_REQUEST, "unsupported messageType")
            )
            self._audit(request, client, outcome, None)
            return outcome.response
        for _ in range(MAX_SERIAL_ATTEMPTS):
            outcome = await self.pool.run(partial(self._enroll, request))
            if outcome.record is None:
                self._audit(request, client, outcome, None)
                return outcome.response
            try:
                await self.store.put(outcome.record)
            except DuplicateSerial:
                continue
            except DuplicateTransaction:
                outcome = await self._resend(request, outcome)
                self._audit(request, client, outcome, outcome.record)
                return outcome.response
            self._audit(request, client, outcome, outcome.record)
            return outcome.response
        raise StoreError("no unique serial number after several attempts")

    async def _resend(self, request: PkiRequest, fresh: _Outcome) -> _Outcome:
        # RFC 8894 §3.3.1.1 / interop-quirks #10: a retried PKCSReq gets the certificate it
        # already has; the freshly signed one is discarded before anyone saw it.
        assert fresh.record is not None and fresh.envelope is not None
        existing = await self.store.get_by_transaction(request.transaction_id)
        if existing is None or existing.public_key_sha256 != fresh.record.public_key_sha256:
            return await self.pool.run(
                partial(self._failure, request, FailInfo.BAD_REQUEST, "transactionID already used")
            )
        return await self.pool.run(partial(self._reissue, request, existing, fresh))

    # ---- jobs: these run on a signing worker thread with that thread's keys ------------

    def _enroll(self, request: PkiRequest, keys: Keyring) -> _Outcome:
        try:
            if not isinstance(request.signer_cert.public_key(), rsa.RSAPublicKey):
                raise Rejected(FailInfo.BAD_ALG, "the reply can only be encrypted to an RSA key")
            envelope = decode_envelope(request.content)
            cek, oaep = _decrypt_key(envelope, keys)
            cert_request = check_csr(load_csr(envelope.open(cek)), self.policy)
            now = self._clock()
            cert = build_certificate(
                cert_request,
                issuer=self.issuer,
                issuer_key=keys.ca_key,
                serial=self._random_serial(),
                now=now,
                policy=self.policy,
            )
            cert_der = cert.public_bytes(Encoding.DER)
            sealed = seal_certificates([cert_der], request, _reply_cipher(envelope), oaep)
            response = build_cert_rep(
                request,
                keys.response_signer,
                status=PkiStatus.SUCCESS,
                envelope=sealed,
                sender_nonce=self._nonce(),
            )
        except UnsupportedAlgorithm as exc:
            return self._failure(request, FailInfo.BAD_ALG, str(exc), keys)
        except MessageError as exc:
            return self._failure(request, FailInfo.BAD_MESSAGE_CHECK, str(exc), keys)
        except Rejected as exc:
            return self._failure(request, exc.fail_info, exc.reason, keys)
        except HsmError:
            raise  # the HSM, not the request: HTTP 503, the client retries
        except Exception:
            # A bug must still be answered the way clients understand (interop-quirks #9).
            log.exception("unexpected error for transaction %r", request.transaction_id)
            return self._failure(request, FailInfo.BAD_REQUEST, "internal error", keys)
        spki = cert_request.public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        record = IssuedCert(
            serial=cert.serial_number,
            subject=cert.subject.rfc4514_string(),
            sans=describe_sans(cert_request.sans),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            transaction_id=request.transaction_id,
            requester_fingerprint=request.signer_fingerprint,
            public_key_sha256=hashlib.sha256(spki).hexdigest(),
            der=cert_der,
            issued_at=now,
        )
        return _Outcome(response, record, "issued", envelope, oaep)

    def _reissue(
        self, request: PkiRequest, existing: IssuedCert, fresh: _Outcome, keys: Keyring
    ) -> _Outcome:
        assert fresh.envelope is not None
        sealed = seal_certificates(
            [existing.der], request, _reply_cipher(fresh.envelope), fresh.oaep
        )
        response = build_cert_rep(
            request,
            keys.response_signer,
            status=PkiStatus.SUCCESS,
            envelope=sealed,
            sender_nonce=self._nonce(),
        )
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


def _decrypt_key(envelope: cms.Envelope, keys: Keyring) -> tuple[bytes, cms.OaepParams | None]:
    """Decrypt the content-encryption key with the RA key the envelope names."""
    for transport in envelope.recipients:
        for cert_id, key in keys.decrypt_keys:
            if transport.recipient.matches(cert_id):
                oaep = transport.oaep
                pad = oaep.padding() if oaep is not None else padding.PKCS1v15()
                return key.decrypt(transport.encrypted_key, pad), oaep
    raise MessageError("the envelope is not encrypted to any of our RA certificates")


def _reply_cipher(envelope: cms.Envelope) -> ContentCipher:
    # Mirror the client's cipher (interop-quirks #5), except that single DES is never sent.
    reply = envelope.cipher.reply_with
    return CIPHERS_BY_NAME[reply] if reply else envelope.cipher


def _unique(items: list[bytes]) -> list[bytes]:
    return list(dict.fromkeys(items))


def default_policy(challenge: bytes | None, validity_days: int) -> IssuancePolicy:
    return IssuancePolicy(challenge=challenge, validity=timedelta(days=validity_days))
