"""GetCert and GetCRL (RFC 8894 §3.3.3-4): a certificate this CA issued, or the current CRL.

Each costs a decryption trip to a signing worker, a store read and a signing trip.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

from cryptography.hazmat.primitives.asymmetric import rsa

from hsmscep.protocol import cms
from hsmscep.protocol.codes import MessageType
from hsmscep.protocol.message import PkiRequest
from hsmscep.service.issuing import Issuing
from hsmscep.service.ports import KeySet
from hsmscep.service.publication import Publication
from hsmscep.service.refusal import Refusal
from hsmscep.service.replies import Outcome, decrypt_key


@dataclass(frozen=True, slots=True)
class _Query:
    """A decrypted GetCert/GetCRL envelope naming a certificate of our CA."""

    target: cms.IssuerAndSerial
    envelope: cms.Envelope
    oaep: cms.OaepParams | None


class Queries:
    """Answers GetCert and GetCRL."""

    def __init__(self, issuing: Issuing, publication: Publication) -> None:
        self.issuing, self.publication = issuing, publication
        self.pool, self.store, self.replies = issuing.pool, issuing.store, issuing.replies
        ca_cert = publication.issuer.certificate
        self._ca_subject_der = ca_cert.subject.public_bytes()
        self._ca_subject = ca_cert.subject.rfc4514_string()
        # The CA certificate's own IssuerAndSerialNumber: sscep's plain `getcrl` sends it.
        self._ca_issuer_der = ca_cert.issuer.public_bytes()
        self._ca_serial = ca_cert.serial_number

    async def answer(self, request: PkiRequest) -> Outcome:
        """The certificate or CRL the request names, sealed to the requester."""
        opened = await self.pool.run(partial(self._open, request))
        if isinstance(opened, Outcome):
            return opened
        reply = partial(self.replies.content, request, opened.envelope, opened.oaep)
        if request.message_type == MessageType.GET_CRL:
            # Any serial under our name asks for our CRL (RFC 8894 §3.3.4): whether we issued
            # it does not matter, the CRL answers for all of them.
            content = cms.crls_only([await self.publication.current_crl()])
            outcome = await self.pool.run(partial(reply, content, "CRL sent"))
            return replace(outcome, subject=self._ca_subject)
        serial = opened.target.serial
        issued = await self.store.get_by_serial(serial)
        if issued is None:
            return await self.issuing.refuse(request, Refusal.UNKNOWN_SERIAL(serial=serial))
        content, reason = cms.certs_only([issued.der]), f"certificate {serial:x} sent"
        outcome = await self.pool.run(partial(reply, content, reason))
        return replace(outcome, subject=issued.subject)

    def _open(self, request: PkiRequest, keys: KeySet) -> _Query | Outcome:
        """Decrypt the query and check it names our CA (a job)."""
        try:
            if not isinstance(request.signer_key, rsa.RSAPublicKey):
                raise Refusal.REPLY_KEY_NOT_RSA()
            envelope = cms.decode_envelope(request.content)
            cek, oaep = decrypt_key(envelope, keys)
            target = cms.decode_issuer_and_serial(envelope.open(cek))
            if not target.issued_by(self._ca_subject_der) and not self._names_ca_cert(
                request, target
            ):
                raise Refusal.ISSUER_NOT_THIS_CA()
        except Exception as exc:
            return self.replies.refused(request, exc, keys)
        return _Query(target, envelope, oaep)

    def _names_ca_cert(self, request: PkiRequest, target: cms.IssuerAndSerial) -> bool:
        """A GetCRL naming the CA certificate itself (its issuer may be an external root)."""
        return (
            request.message_type == MessageType.GET_CRL
            and target.serial == self._ca_serial
            and target.issued_by(self._ca_issuer_der)
        )
