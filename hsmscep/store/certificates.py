"""Issued certificates in SQLite: the certificates table's rows, and the writer that inserts
each group-commit batch (groupcommit.py) on the commit thread, over a connection of its own.

This is the hot path: a signing worker's submit() goes straight to the committer's queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from hsmscep.errors import DuplicateSerial, DuplicateTransaction, StoreError
from hsmscep.store.checkpoint import WRITER_AUTOCHECKPOINT, WalCheckpointer
from hsmscep.store.database import BUSY_TIMEOUT_MS, Database
from hsmscep.store.groupcommit import CommitQueue
from hsmscep.store.records import MAX_SERIAL, IssuedCert
from hsmscep.store.schema import iso, serial_from_key, serial_key

log = logging.getLogger(__name__)

_LOCK_POLL = 0.0002

_COLUMNS = (
    "serial, subject, sans_json, not_before, not_after, transaction_id,"
    " requester_fingerprint, public_key_sha256, der, status, issued_at"
)
_INSERT = f"INSERT INTO certificates ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SELECT = f"SELECT {_COLUMNS} FROM certificates"


def _to_row(cert: IssuedCert) -> tuple[object, ...]:
    return (
        serial_key(cert.serial),
        cert.subject,
        json.dumps(list(cert.sans), ensure_ascii=False),
        iso(cert.not_before),
        iso(cert.not_after),
        cert.transaction_id,
        cert.requester_fingerprint,
        cert.public_key_sha256,
        bytes(cert.der),
        cert.status,
        iso(cert.issued_at or datetime.now(UTC)),
    )


def _from_row(row: Any) -> IssuedCert:
    serial, subject, sans, nbf, naf, tid, requester, spki, der, status, issued = row
    return IssuedCert(
        serial=serial_from_key(serial),
        subject=subject,
        sans=tuple(json.loads(sans)),
        not_before=datetime.fromisoformat(nbf),
        not_after=datetime.fromisoformat(naf),
        transaction_id=tid,
        requester_fingerprint=requester,
        public_key_sha256=spki,
        der=der,
        status=status,
        issued_at=datetime.fromisoformat(issued),
    )


def _store_error(cls: type[StoreError], message: str, cause: BaseException) -> StoreError:
    # A fresh exception per caller: one instance raised in many tasks would mix tracebacks.
    error = cls(message)
    error.__cause__ = cause
    return error


def _insert_error(cert: IssuedCert, exc: sqlite3.IntegrityError) -> StoreError:
    text = str(exc)
    if "certificates.serial" in text:
        return _store_error(DuplicateSerial, f"serial {cert.serial:x} is already stored", exc)
    if "certificates.transaction_id" in text:
        message = f"transaction {cert.transaction_id!r} already has a certificate"
        return _store_error(DuplicateTransaction, message, exc)
    return _store_error(StoreError, f"certificate {cert.serial:x} rejected: {exc}", exc)


def _batch_failed(exc: BaseException, size: int) -> StoreError:
    log.error("certificate batch of %d rolled back: %s", size, exc)
    return _store_error(StoreError, f"could not store certificate: {exc}", exc)


def connect_writer(path: str, synchronous: str) -> sqlite3.Connection:
    """The group-commit writer's connection: plain sqlite3, used only on the commit thread."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        # The writer polls for the write lock itself (_begin_immediate); once it holds the lock
        # nothing it runs can be busy.
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        # Checkpoints are the WalCheckpointer's, off this connection's COMMITs.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT}")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _begin_immediate(conn: sqlite3.Connection) -> None:
    """Take the write lock, polling every _LOCK_POLL seconds for up to the busy timeout.

    `conn` has busy_timeout 0 (connect_writer).
    """
    # SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ms between attempts, and another
    # server process that commits every millisecond takes the lock again in between: batches
    # waited up to 80 ms for it (bench/PROFILE.md).
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(_LOCK_POLL)


def _insert_batch(conn: sqlite3.Connection, certs: list[IssuedCert]) -> list[BaseException | None]:
    """Insert and commit certs in one transaction, on the database thread; one outcome each."""
    outcomes: list[BaseException | None] | None = None
    _begin_immediate(conn)
    if len(certs) > 1:
        # executemany in the common case; a duplicate sends us back to row-by-row inserts to
        # tell each caller its outcome.
        conn.execute("SAVEPOINT batch")
        try:
            conn.executemany(_INSERT, [_to_row(cert) for cert in certs])
            outcomes = [None] * len(certs)
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK TO batch")
    if outcomes is None:
        # A lone row (most batches under load) needs no savepoint: row by row, every statement
        # the database thread runs per commit counts.
        outcomes = []
        for cert in certs:
            try:
                conn.execute(_INSERT, _to_row(cert))
                outcomes.append(None)
            except sqlite3.IntegrityError as exc:
                # A failed INSERT undoes only itself; the rest of the batch stays.
                outcomes.append(_insert_error(cert, exc))
    conn.execute("COMMIT")  # also releases the savepoint
    return outcomes


class Certificates(CommitQueue[IssuedCert]):
    """Issued certificates: group-committed inserts on `writer`, reads on the shared reader;
    the WAL the inserts fill is checkpointed by a thread of its own."""

    def __init__(
        self, database: Database, writer: sqlite3.Connection, *, max_batch: int, linger: float
    ) -> None:
        self._db = database
        self._writer = writer
        self._checkpointer = WalCheckpointer(database.path)
        super().__init__(
            self._write_batch,
            lambda: database.closed,
            max_batch=max_batch,
            on_failure=_batch_failed,
            linger=linger,
        )

    async def get_by_transaction(self, transaction_id: str) -> IssuedCert | None:
        """The certificate issued for this transactionID, if any."""
        rows = await self._db.read(f"{_SELECT} WHERE transaction_id = ?", (transaction_id,))
        return _from_row(rows[0]) if rows else None

    async def get_by_serial(self, serial: int) -> IssuedCert | None:
        """The certificate with this serial number, if any."""
        if not 0 < serial <= MAX_SERIAL:
            return None
        rows = await self._db.read(f"{_SELECT} WHERE serial = ?", (serial_key(serial),))
        return _from_row(rows[0]) if rows else None

    async def count(self) -> int:
        """Number of stored certificates."""
        [(n,)] = await self._db.read("SELECT COUNT(*) FROM certificates")
        return int(n)

    async def serials(self) -> list[int]:
        """All stored serial numbers, ascending."""
        rows = await self._db.read("SELECT serial FROM certificates ORDER BY serial")
        return [serial_from_key(serial) for (serial,) in rows]

    async def close(self) -> None:
        """Commit everything queued, stop the commit and checkpoint threads, close the writer's
        connection."""
        await asyncio.to_thread(self._committer.close)
        await asyncio.to_thread(self._checkpointer.close)
        try:
            self._writer.close()
        except sqlite3.Error as exc:
            raise StoreError(f"closing the certificate store failed: {exc}") from exc

    def _write_batch(self, certs: list[IssuedCert]) -> list[BaseException | None]:
        # On the thread leading the group commit. The write lock, which the other server
        # processes wait for, is held for the inserts and the COMMIT only.
        conn = self._writer
        try:
            outcomes = _insert_batch(conn, certs)
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # some errors (SQLITE_FULL, IOERR) have already rolled it back
            raise
        refused = sum(outcome is not None for outcome in outcomes)
        log.debug("certificate batch committed: %d rows, %d refused", len(certs), refused)
        return outcomes
