"""What the CA publishes: GetCACaps, GetCACert, GetNextCACert bodies, and the CRL.

The bodies that never change are built once; GetNextCACert is signed once per process. The
CRL lives in the store, so every server process (and the CLI that revokes) agrees on it; a
refresher keeps it current after revocations and before it expires.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from functools import partial

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.errors import HsmError, StoreError
from hsmscep.hsm.pool import SigningPool
from hsmscep.policy import crl
from hsmscep.policy.issuance import Issuer
from hsmscep.policy.profiles import Profile, Profiles
from hsmscep.protocol import cms
from hsmscep.protocol.certrep import sign_next_ca_certs
from hsmscep.service.ports import KeySet, Store
from hsmscep.store.records import CrlInfo, Revocation

log = logging.getLogger(__name__)

CA_RA_CERT = "application/x-x509-ca-ra-cert"
CA_CERT = "application/x-x509-ca-cert"
NEXT_CA_CERT = "application/x-x509-next-ca-cert"
MAX_CRL_ATTEMPTS = 5
CRL_CHECK_SECONDS = 30.0


class Publication:
    """The CA's published bodies and its CRL, over the signing pool and the store."""

    def __init__(
        self,
        *,
        pool: SigningPool[KeySet],
        store: Store,
        issuer: Issuer,
        ra_certs: list[x509.Certificate],
        chain: list[x509.Certificate],
        profiles: Profiles,
        next_ca_certs: list[x509.Certificate] | None,
        crl_lifetime: timedelta,
        clock: Callable[[], datetime],
    ) -> None:
        self.pool, self.store, self.issuer = pool, store, issuer
        # GetNextCACert is advertised exactly while a next CA is prepared (RFC 8894 §3.5.2).
        self._caps: dict[str, bytes] = {}
        for profile in profiles.all():
            caps = tuple(c for c in profile.caps if c != "GetNextCACert")
            if next_ca_certs:
                caps += ("GetNextCACert",)
            self._caps[profile.name] = "\n".join(caps).encode()
        self._next_ca_ders = [c.public_bytes(Encoding.DER) for c in next_ca_certs or []]
        self._next_ca_body: bytes | None = None
        ders = [c.public_bytes(Encoding.DER) for c in (issuer.certificate, *ra_certs, *chain)]
        self.ca_cert_body = cms.certs_only(list(dict.fromkeys(ders)))
        self.ca_cert_type = CA_RA_CERT
        self.ca_cert_der = ders[0]
        self._crl_lifetime, self._clock = crl_lifetime, clock
        self._crl_lock = asyncio.Lock()
        self._crl_cache: tuple[int, bytes] | None = None

    def ca_caps(self, profile: Profile) -> bytes:
        """The GetCACaps body of an endpoint."""
        return self._caps[profile.name]

    async def next_ca_cert(self) -> bytes | None:
        """The GetNextCACert reply, signed by the current RA key once per process; None
        while no next CA is prepared."""
        if not self._next_ca_ders:
            return None
        if self._next_ca_body is None:
            signed = await self.pool.run(partial(_sign_next_ca, self._next_ca_ders))
            self._next_ca_body = signed
        return self._next_ca_body

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
                async with self.store.crl_signing():
                    # On a shared store another node may have published while we waited.
                    status = await self.store.crl_status()
                    latest, now = status.latest, self._clock()
                    if (
                        latest is not None
                        and latest.revision >= status.revision
                        and not crl.refresh_due(latest.this_update, latest.next_update, now)
                    ):
                        continue
                    # Read after the revision: the list holds at least what that revision counts.
                    revoked = await self.store.revocations()
                    number = latest.number + 1 if latest is not None else 1
                    info = CrlInfo(number, status.revision, now, now + self._crl_lifetime)
                    log.info("signing CRL %d", number)
                    der = await self.pool.run(partial(self._sign_crl, info, revoked))
                    published = await self.store.put_crl(info, der)
                if published:
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

    def _sign_crl(self, info: CrlInfo, revoked: list[Revocation], keys: KeySet) -> bytes:
        """Sign the CRL `info` describes with the CA key (a job)."""
        entries = [
            crl.RevokedEntry(
                r.serial, r.revoked_at, crl.REASONS.get(r.reason, x509.ReasonFlags.unspecified)
            )
            for r in revoked
        ]
        signed = crl.build_crl(
            issuer=self.issuer,
            issuer_key=keys.crl_key,
            number=info.number,
            revoked=entries,
            this_update=info.this_update,
            next_update=info.next_update,
        )
        return signed.public_bytes(Encoding.DER)


def _sign_next_ca(certs_der: list[bytes], keys: KeySet) -> bytes:
    return sign_next_ca_certs(certs_der, keys.response_signer)
