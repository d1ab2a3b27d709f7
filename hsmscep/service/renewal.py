"""Renewal by signer: a request signed by a certificate this CA issued needs no challenge.

The authorization policy of renewals (RFC 8894 §3.3.1.2, interop-quirks #11): it runs before
decryption, costs one or two store reads, and replaces the profile's challenge and decisions.
What the new certificate keeps is hsmscep.policy.renewal's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from hsmscep.errors import Rejected
from hsmscep.policy.renewal import RenewalPolicy, StoredSigner, check_signer, renewal_transaction_id
from hsmscep.protocol.message import PkiRequest
from hsmscep.service.authorization import ALLOW, Allow
from hsmscep.service.ports import CertificateStore


@dataclass(frozen=True, slots=True)
class SignerRenewal:
    """Renewal by signer: a request signed by a certificate this CA issued, stored, and not
    revoked, within the renewal window; it replaces the profile's challenge and decisions."""

    store: CertificateStore
    ca_cert: x509.Certificate
    policy: RenewalPolicy
    clock: Callable[[], datetime]

    async def authorize(self, request: PkiRequest) -> Allow | Rejected:
        signer = await self._stored_signer(request)
        try:
            check_signer(
                request.signer_cert,
                signer,
                ca_cert=self.ca_cert,
                now=self.clock(),
                policy=self.policy,
            )
        except Rejected as refusal:
            return refusal
        return ALLOW

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
