"""Issuing durably: one signing job whose certificate joins the store's next group commit.

The job signs the certificate and its CertRep; the store's commit thread completes the request
once the row is durable, so the event loop sees the request once (bench/PROFILE.md). A
retried transactionID gets the certificate it already has (RFC 8894 §3.3.1.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TypeVar

from hsmscep.errors import DuplicateSerial, DuplicateTransaction, Rejected, StoreError
from hsmscep.hsm.pool import Deferred, Finish, SigningPool
from hsmscep.protocol.message import PkiRequest
from hsmscep.service.authorization import Candidate
from hsmscep.service.health import StoreHealth
from hsmscep.service.ports import KeySet, Store
from hsmscep.service.refusal import Refusal
from hsmscep.service.replies import Outcome, Replies

MAX_SERIAL_ATTEMPTS = 3

# What a signing job hands back: an answer, or a request awaiting a decision.
_Opened = TypeVar("_Opened", bound="Outcome | Candidate")


class Issuing:
    """Runs issuing jobs on the pool and commits what they issue before returning."""

    def __init__(self, pool: SigningPool[KeySet], store: Store, replies: Replies) -> None:
        self.pool, self.store, self.replies = pool, store, replies
        self.health = StoreHealth()

    async def issue_and_store(self, job: Callable[[KeySet], _Opened]) -> _Opened:
        """Run `job` on the pool; the certificate it issues is committed before this returns.
        StoreError at once, before any HSM work, while the store is known to be failing."""
        if self.health.down:
            await self._probe()
        for _ in range(MAX_SERIAL_ATTEMPTS):
            try:
                opened = await self.pool.run_deferred(partial(self._committed, job))
            except DuplicateSerial:
                continue  # a fresh random serial on the next attempt
            except DuplicateTransaction:
                raise
            except StoreError:
                self.health.failed()
                raise
            if isinstance(opened, Outcome) and opened.record is not None:
                self.health.stored()
            return opened
        raise StoreError("no unique serial number after several attempts")

    async def _probe(self) -> None:
        """While the store is down: 503 until the next probe is due, then a write probe
        (no HSM work); the request goes on only if the store took it."""
        self.health.check()
        try:
            await self.store.probe()
        except StoreError:
            self.health.failed()
            raise
        self.health.stored()

    def _committed(self, job: Callable[[KeySet], _Opened], keys: KeySet) -> _Opened | Deferred:
        """Run `job`; hand the certificate it issued to the store's commit thread, which
        completes the request once the row is durable. The signing worker goes straight on
        with the next request."""
        outcome = job(keys)
        if not isinstance(outcome, Outcome) or outcome.record is None:
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

    async def resend(self, request: PkiRequest, fresh: Outcome) -> Outcome:
        """The certificate the transaction already has, in place of the freshly signed one.

        RFC 8894 §3.3.1.1 / interop-quirks #10: a retried PKCSReq gets the certificate it
        already has; the fresh one is discarded before anyone saw it.
        """
        assert fresh.record is not None and fresh.envelope is not None
        existing = await self.store.get_by_transaction(fresh.record.transaction_id)
        if existing is None or existing.public_key_sha256 != fresh.record.public_key_sha256:
            return await self.refuse(request, Refusal.TRANSACTION_USED())
        return await self.pool.run(partial(self.replies.reissue, request, existing, fresh))

    async def refuse(self, request: PkiRequest, refusal: Rejected) -> Outcome:
        """The signed FAILURE answering `refusal` (one trip to a signing worker)."""
        return await self.pool.run(partial(self.replies.failure, request, refusal))
