"""The shared store: PgStore, one PostgreSQL database behind hsmscep.service.ports.Store.

Several hsmscep nodes open the same database: serials and transactionIDs are unique keys, a
challenge is consumed by one conditional UPDATE, decisions lock their row, CRL numbers are a
primary key and one node at a time signs a CRL (an advisory lock, crl_signing()).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from hsmscep.errors import ConfigError
from hsmscep.store.facade import StoreFacade
from hsmscep.store.pgcertificates import PgCertificates
from hsmscep.store.pgdatabase import (
    CONNECTION_ERRORS,
    PgDatabase,
    connect,
    create_pool,
    migrate,
    redact,
    store_error,
)
from hsmscep.store.pgschema import CRL_LOCK
from hsmscep.store.pgtables import PgChallenges, PgPendingRequests, PgRevocations
from hsmscep.store.records import StoreStats
from hsmscep.store.stats import fold, queries

POOL_SIZE = 8  # reads and rare writes; the group commit has a connection of its own


class PgStore(StoreFacade):
    """Everything the service keeps, in one PostgreSQL database; put() returns only once the
    row is committed. Each method is the matching table part's."""

    _db: PgDatabase

    def __init__(
        self, database: PgDatabase, url: str, password: str | None, *, max_batch: int, linger: float
    ) -> None:
        self._db = database
        self._certificates = PgCertificates(
            database, url, password, max_batch=max_batch, linger=linger
        )
        self._revocations = PgRevocations(database)
        self._pending = PgPendingRequests(database)
        self._challenges = PgChallenges(database)
        self._opened()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        password: str | None = None,
        max_batch: int = 256,
        linger: float = 0.0,
        pool_size: int = POOL_SIZE,
    ) -> PgStore:
        """Connect, apply the migrations the database lacks (refusing a newer schema), and
        start the group-commit thread. `url` is postgresql://user@host/db (no password)."""
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, not {max_batch}")
        if linger < 0:
            raise ConfigError(f"the commit linger must not be negative, not {linger}")
        where = redact(url)
        pool: Any = None
        try:
            conn = await connect(url, password)
            try:
                await migrate(conn, where)
            finally:
                await conn.close()
            pool = await create_pool(url, password, max(2, pool_size))
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            if pool is not None:
                await pool.close()
            raise store_error(f"cannot open certificate store {where}", exc) from exc
        return cls(PgDatabase(where, pool), url, password, max_batch=max_batch, linger=linger)

    @asynccontextmanager
    async def crl_signing(self) -> AsyncIterator[None]:
        """Held while this node signs a CRL: other nodes wait, then find it published."""
        async with self._db.session_lock(CRL_LOCK):
            yield

    async def probe(self) -> None:
        async with self._db.transaction() as conn:
            # A real row write (the revision rewritten as it is) that a database refusing
            # writes fails, and a statement that needs the certificates table.
            await conn.execute("UPDATE revocation_state SET revision = revision WHERE id = 1")
            await conn.execute("DELETE FROM certificates WHERE serial = 'probe'")

    async def stats(self, now: datetime, days: int) -> StoreStats:
        """The counts `hsmscep status` shows, issuance per hour over the last `days`."""
        rows = [await self._db.read(sql, *p) for sql, p in queries("postgresql", now, days)]
        return fold(rows, now, days)
