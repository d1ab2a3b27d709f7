"""Issued certificates in PostgreSQL: group commit as in SQLite (groupcommit.py), the writer
being one asyncpg connection driven by a private event loop on the commit thread.

The commit thread owns its loop and connection, so a signing worker's submit() goes straight
to the committer's queue and the server's event loop sees the request once, as with SQLite.
A dead connection (the database restarted) is replaced at the next batch; a batch that failed
on a dead connection is retried once on a fresh one. If it had in fact committed before the
connection died, its rows clash with themselves: DuplicateSerial (the service signs again with
a fresh serial) and then DuplicateTransaction, which the service answers with the stored
certificate. Nothing is issued twice and nothing unstored is answered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg

from hsmscep.errors import DuplicateSerial, DuplicateTransaction, StoreError
from hsmscep.store.certificates import _COLUMNS, _from_row, _store_error, _to_row
from hsmscep.store.groupcommit import CommitQueue
from hsmscep.store.pgdatabase import CONNECTION_ERRORS, PgDatabase, connect, store_error
from hsmscep.store.records import MAX_SERIAL, IssuedCert
from hsmscep.store.schema import serial_from_key, serial_key

log = logging.getLogger(__name__)

_INSERT = (
    f"INSERT INTO certificates ({_COLUMNS}) VALUES ({', '.join(f'${i}' for i in range(1, 12))})"
)
# A batch as one statement: one array per column, unnested into rows.
_TYPES = ("text",) * 8 + ("bytea", "text", "text")
_INSERT_MANY = (
    f"INSERT INTO certificates ({_COLUMNS}) SELECT * FROM unnest("
    + ", ".join(f"${i}::{kind}[]" for i, kind in enumerate(_TYPES, 1))
    + ")"
)
_SELECT = f"SELECT {_COLUMNS} FROM certificates"


def _insert_error(cert: IssuedCert, exc: asyncpg.UniqueViolationError) -> StoreError:
    constraint = getattr(exc, "constraint_name", "") or ""
    if constraint == "certificates_pkey":
        return _store_error(DuplicateSerial, f"serial {cert.serial:x} is already stored", exc)
    if constraint == "certificates_transaction_id_key":
        message = f"transaction {cert.transaction_id!r} already has a certificate"
        return _store_error(DuplicateTransaction, message, exc)
    return _store_error(StoreError, f"certificate {cert.serial:x} rejected: {exc}", exc)


def _batch_failed(exc: BaseException, size: int) -> StoreError:
    log.error("certificate batch of %d not stored: %s", size, exc)
    return store_error("could not store certificate", exc)


async def _insert_batch(conn: Any, certs: list[IssuedCert]) -> list[BaseException | None]:
    """Insert and commit certs in one statement (one round trip, its own transaction); on a
    clash, row by row to tell each caller its outcome. One outcome each."""
    rows = [_to_row(cert) for cert in certs]
    if len(certs) > 1:
        try:
            await conn.execute(_INSERT_MANY, *(list(column) for column in zip(*rows, strict=True)))
            return [None] * len(certs)
        except asyncpg.UniqueViolationError:
            pass  # nothing of the statement is stored
    outcomes: list[BaseException | None] = []
    for cert, row in zip(certs, rows, strict=True):
        try:
            await conn.execute(_INSERT, *row)  # each row its own implicit transaction
            outcomes.append(None)
        except asyncpg.UniqueViolationError as exc:
            outcomes.append(_insert_error(cert, exc))
    return outcomes


class PgCertificates(CommitQueue[IssuedCert]):
    """Issued certificates: group-committed inserts on the commit thread, reads on the pool."""

    def __init__(
        self, database: PgDatabase, url: str, password: str | None, *, max_batch: int, linger: float
    ) -> None:
        self._db = database
        self._url, self._password = url, password
        self._loop: asyncio.AbstractEventLoop | None = None  # the commit thread's own
        self._conn: Any = None
        super().__init__(
            self._write_batch,
            lambda: database.closed,
            max_batch=max_batch,
            on_failure=_batch_failed,
            linger=linger,
        )

    async def get_by_transaction(self, transaction_id: str) -> IssuedCert | None:
        """The certificate issued for this transactionID, if any."""
        rows = await self._db.read(f"{_SELECT} WHERE transaction_id = $1", transaction_id)
        return _from_row(tuple(rows[0])) if rows else None

    async def get_by_serial(self, serial: int) -> IssuedCert | None:
        """The certificate with this serial number, if any."""
        if not 0 < serial <= MAX_SERIAL:
            return None
        rows = await self._db.read(f"{_SELECT} WHERE serial = $1", serial_key(serial))
        return _from_row(tuple(rows[0])) if rows else None

    async def count(self) -> int:
        """Number of stored certificates."""
        rows = await self._db.read("SELECT COUNT(*) FROM certificates")
        return int(rows[0][0])

    async def serials(self) -> list[int]:
        """All stored serial numbers, ascending."""
        rows = await self._db.read("SELECT serial FROM certificates ORDER BY serial")
        return [serial_from_key(row[0]) for row in rows]

    async def close(self) -> None:
        """Commit everything queued, stop the commit thread, close the writer's connection."""
        await asyncio.to_thread(self._close_writer)

    def _close_writer(self) -> None:
        self._committer.close()
        loop, conn = self._loop, self._conn
        if loop is None:
            return
        try:
            if conn is not None and not conn.is_closed():
                loop.run_until_complete(conn.close(timeout=5))
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("closing the certificate writer's connection: %s", exc)
        finally:
            loop.close()

    def _write_batch(self, certs: list[IssuedCert]) -> list[BaseException | None]:
        # On the commit thread: its loop runs only here, between batches it is idle.
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        outcomes = self._loop.run_until_complete(self._write(certs))
        refused = sum(outcome is not None for outcome in outcomes)
        log.debug("certificate batch committed: %d rows, %d refused", len(certs), refused)
        return outcomes

    async def _write(self, certs: list[IssuedCert]) -> list[BaseException | None]:
        for attempt in (1, 2):
            fresh = self._conn is None or self._conn.is_closed()
            try:
                if fresh:
                    self._conn = None
                    self._conn = await connect(self._url, self._password)
                return await _insert_batch(self._conn, certs)
            except CONNECTION_ERRORS as exc:
                await self._drop_connection()
                # A connection that died under us earns one retry on a new one (it had been
                # idle while the database restarted); a refused connect does not.
                if fresh or attempt == 2:
                    raise store_error("certificate store unavailable", exc) from exc
                log.warning("certificate writer lost its connection, retrying: %s", exc)
        raise AssertionError("unreachable")

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
