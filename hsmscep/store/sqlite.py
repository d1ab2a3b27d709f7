"""The certificate store: issued certificates in SQLite (WAL), written by group commit.

This is the only module that talks to SQLite; sqlite3 errors become StoreError here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import aiosqlite

from hsmscep.errors import (
    ConfigError,
    DuplicateSerial,
    DuplicateTransaction,
    RequestConflict,
    StoreError,
    UnknownCertificate,
    UnknownRequest,
)
from hsmscep.store.groupcommit import GroupCommitter
from hsmscep.store.records import (
    MAX_SERIAL,
    CrlInfo,
    CrlStatus,
    IssuedCert,
    OneTimeChallenge,
    PendingRequest,
    Revocation,
)

log = logging.getLogger(__name__)

_BUSY_TIMEOUT_MS = 5000
_LOCK_POLL = 0.0002
_KEEP_CRLS = 16

# Migration N+1 is _MIGRATIONS[N]. Statements are run one by one rather than with executescript,
# which would COMMIT the migration transaction before running.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE certificates (
            serial TEXT PRIMARY KEY,
            subject TEXT NOT NULL,
            sans_json TEXT NOT NULL,
            not_before TEXT NOT NULL,
            not_after TEXT NOT NULL,
            transaction_id TEXT UNIQUE NOT NULL,
            requester_fingerprint TEXT NOT NULL,
            public_key_sha256 TEXT NOT NULL,
            der BLOB NOT NULL,
            status TEXT NOT NULL,
            issued_at TEXT NOT NULL
        )""",
        "CREATE INDEX certificates_subject ON certificates (subject)",
        "CREATE INDEX certificates_requester ON certificates (requester_fingerprint)",
        "CREATE INDEX certificates_public_key ON certificates (public_key_sha256)",
        "CREATE INDEX certificates_not_after ON certificates (not_after)",
    ),
    (
        # Revocation: the certificate row carries it; `revision` counts revocations so that
        # every server process can tell, with one read, whether its CRL is out of date.
        "ALTER TABLE certificates ADD COLUMN revoked_at TEXT",
        "ALTER TABLE certificates ADD COLUMN revocation_reason TEXT",
        "CREATE INDEX certificates_revoked ON certificates (serial) WHERE revoked_at IS NOT NULL",
        """CREATE TABLE revocation_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            revision INTEGER NOT NULL
        )""",
        "INSERT INTO revocation_state (id, revision) VALUES (1, 0)",
        # Published CRLs; the number is the CRLNumber, so two processes cannot publish the same.
        """CREATE TABLE crls (
            number INTEGER PRIMARY KEY,
            revision INTEGER NOT NULL,
            this_update TEXT NOT NULL,
            next_update TEXT NOT NULL,
            der BLOB NOT NULL
        )""",
    ),
    (
        # Requests waiting for an operator ([enroll] approval = "manual"). The CSR was checked
        # when it arrived; the certificate is issued at the first poll after approval.
        """CREATE TABLE pending_requests (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            transaction_id TEXT UNIQUE NOT NULL,
            csr_der BLOB NOT NULL,
            requester_fingerprint TEXT NOT NULL,
            requester_key_sha256 TEXT NOT NULL,
            requester_ip TEXT NOT NULL,
            subject TEXT NOT NULL,
            sans_json TEXT NOT NULL,
            key_description TEXT NOT NULL,
            created_at TEXT NOT NULL,
            status TEXT NOT NULL,
            decided_at TEXT
        )""",
        "CREATE INDEX pending_requests_status ON pending_requests (status)",
    ),
    (
        # One-time enrollment challenges ([enroll] challenge_mode = "one_time"). Only the
        # SHA-256 of the challenge is stored. `profile` is '' for the server-wide pool (named
        # profiles come later). A challenge is consumed by one conditional UPDATE.
        """CREATE TABLE challenges (
            hash TEXT PRIMARY KEY,
            profile TEXT NOT NULL,
            subject_pattern TEXT,
            san_pattern TEXT,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            used_at TEXT,
            used_by TEXT
        )""",
        "CREATE INDEX challenges_expires ON challenges (expires_at)",
    ),
    (
        # The enrollment profile a held request came in through: its template applies when
        # the request is issued after approval.
        "ALTER TABLE pending_requests ADD COLUMN profile TEXT NOT NULL DEFAULT 'default'",
    ),
    (
        # No query reads these: each was one more random-key B-tree insert (and WAL page) per
        # issued certificate, on the commit that every response waits for. not_after stays:
        # it grows in time order, so its inserts append, and expiry reports want it.
        "DROP INDEX certificates_subject",
        "DROP INDEX certificates_requester",
        "DROP INDEX certificates_public_key",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_COLUMNS = (
    "serial, subject, sans_json, not_before, not_after, transaction_id,"
    " requester_fingerprint, public_key_sha256, der, status, issued_at"
)
_INSERT = f"INSERT INTO certificates ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SELECT = f"SELECT {_COLUMNS} FROM certificates"


_PENDING_COLUMNS = (
    "id, transaction_id, csr_der, requester_fingerprint, requester_key_sha256, requester_ip,"
    " subject, sans_json, key_description, created_at, status, decided_at, profile"
)
_SELECT_PENDING = f"SELECT {_PENDING_COLUMNS} FROM pending_requests"


def _pending_from_row(row: Any) -> PendingRequest:
    rid, tid, csr, fingerprint, key_hash, ip, subject, sans, key, created, status, decided = row[
        :12
    ]
    return PendingRequest(
        profile=row[12],
        id=int(rid),
        transaction_id=tid,
        csr_der=bytes(csr),
        requester_fingerprint=fingerprint,
        requester_key_sha256=key_hash,
        requester_ip=ip,
        subject=subject,
        sans=tuple(json.loads(sans)),
        key_description=key,
        created_at=datetime.fromisoformat(created),
        status=status,
        decided_at=datetime.fromisoformat(decided) if decided is not None else None,
    )


_CHALLENGE_COLUMNS = (
    "hash, profile, subject_pattern, san_pattern, created_at, expires_at, used_at, used_by"
)
_SELECT_CHALLENGE = f"SELECT {_CHALLENGE_COLUMNS} FROM challenges"


def _challenge_from_row(row: Any) -> OneTimeChallenge:
    digest, profile, subject_pattern, san_pattern, created, expires, used, used_by = row
    return OneTimeChallenge(
        hash=digest,
        profile=profile,
        subject_pattern=subject_pattern,
        san_pattern=san_pattern,
        created_at=datetime.fromisoformat(created),
        expires_at=datetime.fromisoformat(expires),
        used_at=datetime.fromisoformat(used) if used is not None else None,
        used_by=used_by,
    )


def _iso_fixed(value: datetime) -> str:
    # Fixed width, so that SQLite's text comparison (expires_at > ?) is time order.
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def _serial_key(serial: int) -> str:
    # Zero-padded so that text order is numeric order and each serial has one spelling.
    return format(serial, "040x")


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _to_row(cert: IssuedCert) -> tuple[object, ...]:
    return (
        _serial_key(cert.serial),
        cert.subject,
        json.dumps(list(cert.sans), ensure_ascii=False),
        _iso(cert.not_before),
        _iso(cert.not_after),
        cert.transaction_id,
        cert.requester_fingerprint,
        cert.public_key_sha256,
        bytes(cert.der),
        cert.status,
        _iso(cert.issued_at or datetime.now(UTC)),
    )


def _from_row(row: Any) -> IssuedCert:
    serial, subject, sans, nbf, naf, tid, requester, spki, der, status, issued = row
    return IssuedCert(
        serial=int(serial, 16),
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


def _begin_immediate(conn: sqlite3.Connection) -> None:
    """Take the write lock, polling every _LOCK_POLL seconds for up to the busy timeout.

    `conn` has busy_timeout 0 (the group-commit writer's connection, see CertStore.open).
    """
    # SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ms between attempts, and another
    # server process that commits every millisecond takes the lock again in between: batches
    # waited up to 80 ms for it (bench/PROFILE.md).
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
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


async def _fetch(db: aiosqlite.Connection, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
    return list(await db.execute_fetchall(sql, params))


async def _rollback(db: aiosqlite.Connection) -> None:
    try:
        await _fetch(db, "ROLLBACK")
    except sqlite3.Error:
        pass  # some errors (SQLITE_FULL, IOERR) have already rolled the transaction back


async def _set_wal(db: aiosqlite.Connection) -> str:
    # Switching to WAL can fail with SQLITE_BUSY without calling the busy handler when other
    # workers open the same new file at once, so retry it here for up to the busy timeout.
    for _ in range(_BUSY_TIMEOUT_MS // 10):
        try:
            [(mode,)] = await _fetch(db, "PRAGMA journal_mode = WAL")
            return str(mode)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            await asyncio.sleep(0.01)
    raise StoreError("database stayed locked while switching to WAL")


async def _connect(path: str, synchronous: str) -> aiosqlite.Connection:
    # aiosqlite does not wait for its worker thread when connecting fails, and that thread then
    # calls into a possibly closed loop; fail here first on the usual causes (no dir, no access).
    await asyncio.to_thread(lambda: sqlite3.connect(path).close())
    # isolation_level=None: no implicit BEGINs, every transaction here is explicit.
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await _fetch(db, f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        mode = await _set_wal(db)
        if mode.lower() != "wal":
            # Without WAL, readers block the writer and the reader connection breaks.
            raise StoreError(f"{path}: journal_mode is {mode}, WAL is required")
        await _fetch(db, f"PRAGMA synchronous = {synchronous}")
        await _fetch(db, "PRAGMA foreign_keys = ON")
    except BaseException:
        await db.close()
        raise
    return db


async def _user_version(db: aiosqlite.Connection) -> int:
    [(version,)] = await _fetch(db, "PRAGMA user_version")
    return int(version)


async def _migrate(db: aiosqlite.Connection, path: str) -> None:
    while True:
        version = await _user_version(db)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: schema version {version} is newer than this hsmscep knows"
                f" ({SCHEMA_VERSION}); refusing to open"
            )
        if version == SCHEMA_VERSION:
            return
        await _fetch(db, "BEGIN IMMEDIATE")
        try:
            # Another worker may have migrated while we waited for the write lock.
            if await _user_version(db) != version:
                await _rollback(db)
                continue
            for statement in _MIGRATIONS[version]:
                await _fetch(db, statement)
            await _fetch(db, f"PRAGMA user_version = {version + 1}")
            await _fetch(db, "COMMIT")
        except BaseException:
            await _rollback(db)
            raise
        log.info("%s: migrated certificate store to schema version %d", path, version + 1)


def _connect_writer(path: str, synchronous: str) -> sqlite3.Connection:
    # A plain sqlite3 connection, used only on the store's commit thread (groupcommit.py).
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        # The writer polls for the write lock itself (_begin_immediate); once it holds the lock
        # nothing it runs can be busy.
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.cancelled():
        return  # the caller gave up; the row is stored (or not) all the same
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _batch_failed(exc: BaseException, size: int) -> StoreError:
    log.error("certificate batch of %d rolled back: %s", size, exc)
    return _store_error(StoreError, f"could not store certificate: {exc}", exc)


class CertStore:
    """Issued certificates; put() returns only once the row is committed."""

    def __init__(
        self,
        writer: sqlite3.Connection,
        reader: aiosqlite.Connection,
        max_batch: int,
        path: str = "",
        linger: float = 0.0,
    ):
        self._path = path  # for the short-lived connections of rare writes (revocation, CRLs)
        self._writer_conn = writer
        self._reader_db = reader
        self._committer: GroupCommitter[IssuedCert] = GroupCommitter(
            self._write_batch,
            max_batch=max_batch,
            on_failure=_batch_failed,
            name="store-commit",
            linger=linger,
        )
        self._closed = False
        self._close_lock = asyncio.Lock()
        self._connections_open = True

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
            reader = await _connect(where, synchronous)
            await _migrate(reader, where)
            # Reads use their own connection so they never see a batch that is not committed yet.
            await _fetch(reader, "PRAGMA query_only = ON")
            writer = await asyncio.to_thread(_connect_writer, where, synchronous)
        except BaseException as exc:
            if reader is not None:
                await reader.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open certificate store {where}: {exc}") from exc
            raise
        return cls(writer, reader, max_batch, where, linger)

    async def put(self, cert: IssuedCert) -> None:
        """Store cert; return once the transaction holding it has committed."""
        if self._closed:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, stored, error)

        self._committer.submit(cert, done)
        await stored

    def batch_with(self, working: Callable[[], int]) -> Callable[[], None]:
        """Let a batch wait (up to the linger given to open()) for the `working()` rows being
        signed when it started. Returns what to call when some of that work ends without a row."""
        self._committer.linger_for(working)
        return self._committer.wake

    def submit(self, cert: IssuedCert, done: Callable[[BaseException | None], None]) -> None:
        """Queue cert from any thread; `done(None)` runs on the store's commit thread once it
        is committed, `done(error)` (DuplicateSerial, DuplicateTransaction, StoreError) if not."""
        if self._closed:
            raise StoreError("store is closed")
        self._committer.submit(cert, done)

    async def get_by_transaction(self, transaction_id: str) -> IssuedCert | None:
        """The certificate issued for this transactionID, if any."""
        rows = await self._read(f"{_SELECT} WHERE transaction_id = ?", (transaction_id,))
        return _from_row(rows[0]) if rows else None

    async def get_by_serial(self, serial: int) -> IssuedCert | None:
        """The certificate with this serial number, if any."""
        if not 0 < serial <= MAX_SERIAL:
            return None
        rows = await self._read(f"{_SELECT} WHERE serial = ?", (_serial_key(serial),))
        return _from_row(rows[0]) if rows else None

    async def count(self) -> int:
        """Number of stored certificates."""
        [(n,)] = await self._read("SELECT COUNT(*) FROM certificates")
        return int(n)

    async def serials(self) -> list[int]:
        """All stored serial numbers, ascending."""
        rows = await self._read("SELECT serial FROM certificates ORDER BY serial")
        return [int(serial, 16) for (serial,) in rows]

    # ---- revocation and CRLs: rare writes, each on its own short-lived connection ---------

    async def revoke(self, serial: int, reason: str, at: datetime) -> tuple[Revocation, bool]:
        """Mark a certificate revoked; (revocation, False) if it already was (idempotent)."""
        if at.utcoffset() is None:
            raise ValueError("at must be timezone-aware")
        key = _serial_key(serial) if 0 < serial <= MAX_SERIAL else None
        async with self._transaction() as db:
            rows = await _fetch(
                db,
                "SELECT revoked_at, revocation_reason FROM certificates WHERE serial = ?",
                (key,),
            )
            if not rows:
                raise UnknownCertificate(f"no certificate with serial {serial:x} was issued here")
            (revoked_at, old_reason), *_ = rows
            if revoked_at is not None:
                return Revocation(serial, datetime.fromisoformat(revoked_at), old_reason), False
            await _fetch(
                db,
                "UPDATE certificates SET status = 'revoked', revoked_at = ?,"
                " revocation_reason = ? WHERE serial = ?",
                (_iso(at), reason, key),
            )
            await _fetch(db, "UPDATE revocation_state SET revision = revision + 1")
        return Revocation(serial, at, reason), True

    async def revocations(self) -> list[Revocation]:
        """Every revoked certificate, by serial."""
        rows = await self._read(
            "SELECT serial, revoked_at, revocation_reason FROM certificates"
            " WHERE revoked_at IS NOT NULL ORDER BY serial"
        )
        return [
            Revocation(int(serial, 16), datetime.fromisoformat(at), reason)
            for serial, at, reason in rows
        ]

    async def crl_status(self) -> CrlStatus:
        """The revocation revision and the newest CRL's metadata, in one read."""
        [(revision, number, crl_revision, this_update, next_update)] = await self._read(
            "SELECT s.revision, c.number, c.revision, c.this_update, c.next_update"
            " FROM revocation_state s LEFT JOIN (SELECT * FROM crls ORDER BY number DESC LIMIT 1)"
            " c ON 1"
        )
        latest = None
        if number is not None:
            latest = CrlInfo(
                int(number),
                int(crl_revision),
                datetime.fromisoformat(this_update),
                datetime.fromisoformat(next_update),
            )
        return CrlStatus(int(revision), latest)

    async def get_crl(self, number: int) -> bytes | None:
        """The DER of CRL `number`, if stored."""
        rows = await self._read("SELECT der FROM crls WHERE number = ?", (number,))
        return bytes(rows[0][0]) if rows else None

    async def put_crl(self, info: CrlInfo, der: bytes) -> bool:
        """Publish a CRL; False if another process already published this number."""
        async with self._transaction() as db:
            await _fetch(
                db,
                "INSERT INTO crls (number, revision, this_update, next_update, der)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (number) DO NOTHING",
                (info.number, info.revision, _iso(info.this_update), _iso(info.next_update), der),
            )
            [(inserted,)] = await _fetch(db, "SELECT changes()")
            # Old CRLs are only kept for a look back; relying parties fetch the newest.
            await _fetch(db, "DELETE FROM crls WHERE number <= ?", (info.number - _KEEP_CRLS,))
        return bool(inserted)

    # ---- pending requests (manual approval): rare writes, short-lived connections ---------

    async def add_pending(self, request: PendingRequest) -> PendingRequest:
        """Store a request for approval; a transactionID already stored returns that row."""
        async with self._transaction() as db:
            await _fetch(
                db,
                "INSERT INTO pending_requests (transaction_id, csr_der, requester_fingerprint,"
                " requester_key_sha256, requester_ip, subject, sans_json, key_description,"
                " created_at, status, profile) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)"
                " ON CONFLICT (transaction_id) DO NOTHING",
                (
                    request.transaction_id,
                    bytes(request.csr_der),
                    request.requester_fingerprint,
                    request.requester_key_sha256,
                    request.requester_ip,
                    request.subject,
                    json.dumps(list(request.sans), ensure_ascii=False),
                    request.key_description,
                    _iso(request.created_at),
                    request.profile,
                ),
            )
            rows = await _fetch(
                db, f"{_SELECT_PENDING} WHERE transaction_id = ?", (request.transaction_id,)
            )
        return _pending_from_row(rows[0])

    async def get_pending(self, transaction_id: str) -> PendingRequest | None:
        """The request stored for approval under this transactionID, if any."""
        rows = await self._read(f"{_SELECT_PENDING} WHERE transaction_id = ?", (transaction_id,))
        return _pending_from_row(rows[0]) if rows else None

    async def get_pending_by_id(self, request_id: int) -> PendingRequest | None:
        rows = await self._read(f"{_SELECT_PENDING} WHERE id = ?", (request_id,))
        return _pending_from_row(rows[0]) if rows else None

    async def pending_requests(self) -> list[PendingRequest]:
        """Every request still waiting for a decision (expired ones included), oldest first."""
        rows = await self._read(f"{_SELECT_PENDING} WHERE status = 'pending' ORDER BY id")
        return [_pending_from_row(row) for row in rows]

    async def decide_pending(
        self,
        request_id: int,
        decision: Literal["approved", "rejected"],
        at: datetime,
        ttl: Callable[[str], timedelta],
    ) -> tuple[PendingRequest, bool]:
        """Approve or reject; (request, False) if it already had this decision (idempotent).
        `ttl` gives the pending TTL of the request's profile.

        Raises UnknownRequest for an unknown id and RequestConflict if the request was decided
        otherwise or has expired.
        """
        if at.utcoffset() is None:
            raise ValueError("at must be timezone-aware")
        async with self._transaction() as db:
            rows = await _fetch(db, f"{_SELECT_PENDING} WHERE id = ?", (request_id,))
            if not rows:
                raise UnknownRequest(f"no pending request with id {request_id}")
            current = _pending_from_row(rows[0])
            done = "approved" if decision == "approved" else "rejected"
            if current.status == done or (done == "approved" and current.status == "issued"):
                return current, False
            if current.status != "pending":
                raise RequestConflict(f"request {request_id} is already {current.status}")
            if current.expired(at, ttl(current.profile)):
                raise RequestConflict(f"request {request_id} has expired")
            await _fetch(
                db,
                "UPDATE pending_requests SET status = ?, decided_at = ? WHERE id = ?",
                (done, _iso(at), request_id),
            )
            rows = await _fetch(db, f"{_SELECT_PENDING} WHERE id = ?", (request_id,))
        return _pending_from_row(rows[0]), True

    async def mark_pending_issued(self, request_id: int) -> None:
        """Record that the approved request's certificate is in the certificates table."""
        async with self._transaction() as db:
            await _fetch(
                db,
                "UPDATE pending_requests SET status = 'issued'"
                " WHERE id = ? AND status = 'approved'",
                (request_id,),
            )

    # ---- one-time challenges: rare writes, short-lived connections ------------------------

    async def add_challenge(self, challenge: OneTimeChallenge) -> None:
        """Store a freshly issued challenge (by its hash; the value itself is never stored)."""
        async with self._transaction() as db:
            await _fetch(
                db,
                "INSERT INTO challenges (hash, profile, subject_pattern, san_pattern,"
                " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    challenge.hash,
                    challenge.profile,
                    challenge.subject_pattern,
                    challenge.san_pattern,
                    _iso_fixed(challenge.created_at),
                    _iso_fixed(challenge.expires_at),
                ),
            )

    async def get_challenge(self, digest: str, profile: str = "") -> OneTimeChallenge | None:
        """The stored challenge with this SHA-256 hex digest, used or not, if any."""
        rows = await self._read(
            f"{_SELECT_CHALLENGE} WHERE hash = ? AND profile = ?", (digest, profile)
        )
        return _challenge_from_row(rows[0]) if rows else None

    async def consume_challenge(
        self, digest: str, at: datetime, used_by: str, profile: str = ""
    ) -> bool:
        """Mark the challenge used; True for exactly one caller, False if unknown/used/expired.

        One conditional UPDATE in its own transaction: of concurrent callers, only the first
        to take SQLite's write lock sees a changed row.
        """
        if at.utcoffset() is None:
            raise ValueError("at must be timezone-aware")
        async with self._transaction() as db:
            await _fetch(
                db,
                "UPDATE challenges SET used_at = ?, used_by = ? WHERE hash = ? AND profile = ?"
                " AND used_at IS NULL AND expires_at > ?",
                (_iso_fixed(at), used_by, digest, profile, _iso_fixed(at)),
            )
            [(changed,)] = await _fetch(db, "SELECT changes()")
        return bool(changed)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        # Not the group-commit writer's connection: its transactions span awaits, and these
        # writes are too rare to deserve a place in its queue. SQLite's busy timeout orders them.
        if self._closed:
            raise StoreError("store is closed")
        try:
            db = await _connect(self._path, "FULL")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open certificate store {self._path}: {exc}") from exc
        try:
            await _fetch(db, "BEGIN IMMEDIATE")
            try:
                yield db
                await _fetch(db, "COMMIT")
            except BaseException:
                await _rollback(db)
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"certificate store write failed: {exc}") from exc
        finally:
            await db.close()

    async def close(self) -> None:
        """Refuse new puts, commit everything queued, close the database. Idempotent."""
        self._closed = True
        async with self._close_lock:
            if not self._connections_open:
                return
            await asyncio.to_thread(self._committer.close)
            self._connections_open = False
            try:
                self._writer_conn.close()
            except sqlite3.Error as exc:
                raise StoreError(f"closing the certificate store failed: {exc}") from exc
            finally:
                await self._reader_db.close()

    async def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        if self._closed:
            raise StoreError("store is closed")
        try:
            return await _fetch(self._reader_db, sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"certificate store read failed: {exc}") from exc

    def _write_batch(self, certs: list[IssuedCert]) -> list[BaseException | None]:
        # On the thread leading the group commit. The write lock, which the other server
        # processes wait for, is held for the inserts and the COMMIT only.
        conn = self._writer_conn
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
