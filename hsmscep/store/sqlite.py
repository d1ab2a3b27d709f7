"""The embedded store: CertStore, one SQLite file (WAL) behind hsmscep.service.ports.Store.

It opens the file and composes the per-table parts: certificates.py (group-committed
issuance), revocations.py, pending.py and challenges.py, over database.py's connections.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Literal

import aiosqlite

from hsmscep.errors import ConfigError, StoreError
from hsmscep.store.certificates import Certificates, connect_writer
from hsmscep.store.challenges import Challenges
from hsmscep.store.database import Database, connect, fetch, migrate
from hsmscep.store.facade import StoreFacade
from hsmscep.store.pending import PendingRequests
from hsmscep.store.records import StoreStats
from hsmscep.store.revocations import Revocations
from hsmscep.store.schema import MIGRATIONS, SCHEMA_VERSION
from hsmscep.store.stats import fold, queries

__all__ = ["SCHEMA_VERSION", "CertStore"]

# The schema history under the name tests knew it by before the split (schema.MIGRATIONS).
_MIGRATIONS = MIGRATIONS


class CertStore(StoreFacade):
    """Everything the service keeps, in one SQLite file; put() returns only once the row is
    committed. Each method is the matching table part's."""

    _db: Database

    def __init__(
        self,
        database: Database,
        writer: sqlite3.Connection,
        *,
        max_batch: int,
        linger: float = 0.0,
    ) -> None:
        self._db = database
        self._certificates = Certificates(database, writer, max_batch=max_batch, linger=linger)
        self._revocations = Revocations(database)
        self._pending = PendingRequests(database)
        self._challenges = Challenges(database)
        self._opened()

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        max_batch: int = 256,
        linger: float = 0.0,
    ) -> CertStore:
        """Open (creating and migrating if needed) the store at path.

        `linger`: seconds a certificate batch may wait for more rows; see batch_with()."""
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, not {max_batch}")
        if linger < 0:
            raise ConfigError(f"the commit linger must not be negative, not {linger}")
        where = os.fspath(path)
        reader: aiosqlite.Connection | None = None
        try:
            reader = await connect(where, synchronous)
            await migrate(reader, where)
            # Reads use their own connection so they never see a batch that is not committed yet.
            await fetch(reader, "PRAGMA query_only = ON")
            writer = await asyncio.to_thread(connect_writer, where, synchronous)
        except BaseException as exc:
            if reader is not None:
                await reader.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open certificate store {where}: {exc}") from exc
            raise
        return cls(Database(where, reader), writer, max_batch=max_batch, linger=linger)

    async def probe(self) -> None:
        async with self._db.transaction() as db:
            # A real page write (the revision rewritten as it is) that a full or read-only disk
            # refuses at COMMIT, and a statement that needs the certificates table to be there.
            await fetch(db, "UPDATE revocation_state SET revision = revision WHERE id = 1")
            await fetch(db, "DELETE FROM certificates WHERE serial = 'probe'")

    async def stats(self, now: datetime, days: int) -> StoreStats:
        """The counts `hsmscep status` shows, issuance per hour over the last `days`."""
        rows = [await self._db.read(sql, p) for sql, p in queries("sqlite", now, days)]
        return fold(rows, now, days)

    @asynccontextmanager
    async def crl_signing(self) -> AsyncIterator[None]:
        """Nothing to hold: the processes on one file settle a race by the CRL number."""
        yield
