"""The SQLite file: opening connections (WAL, pragmas), bringing the schema up to date, the
shared read connection and the short-lived connections of rare writes.

sqlite3 errors become StoreError here, in certificates.py (the group-commit writer) and in
sqlite.py (opening the store).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite

from hsmscep.errors import StoreError
from hsmscep.store.schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000


async def fetch(db: aiosqlite.Connection, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
    """Run one statement and return its rows."""
    return list(await db.execute_fetchall(sql, params))


async def rollback(db: aiosqlite.Connection) -> None:
    """Roll back the open transaction, if the error that ended it has not already."""
    try:
        await fetch(db, "ROLLBACK")
    except sqlite3.Error:
        pass  # some errors (SQLITE_FULL, IOERR) have already rolled the transaction back


async def _set_wal(db: aiosqlite.Connection) -> str:
    # Switching to WAL can fail with SQLITE_BUSY without calling the busy handler when other
    # workers open the same new file at once, so retry it here for up to the busy timeout.
    for _ in range(BUSY_TIMEOUT_MS // 10):
        try:
            [(mode,)] = await fetch(db, "PRAGMA journal_mode = WAL")
            return str(mode)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            await asyncio.sleep(0.01)
    raise StoreError("database stayed locked while switching to WAL")


async def connect(path: str, synchronous: str) -> aiosqlite.Connection:
    """An aiosqlite connection in WAL mode, with no implicit transactions."""
    # aiosqlite does not wait for its worker thread when connecting fails, and that thread then
    # calls into a possibly closed loop; fail here first on the usual causes (no dir, no access).
    await asyncio.to_thread(lambda: sqlite3.connect(path).close())
    # isolation_level=None: no implicit BEGINs, every transaction here is explicit.
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await fetch(db, f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = await _set_wal(db)
        if mode.lower() != "wal":
            # Without WAL, readers block the writer and the reader connection breaks.
            raise StoreError(f"{path}: journal_mode is {mode}, WAL is required")
        await fetch(db, f"PRAGMA synchronous = {synchronous}")
        await fetch(db, "PRAGMA foreign_keys = ON")
    except BaseException:
        await db.close()
        raise
    return db


async def _user_version(db: aiosqlite.Connection) -> int:
    [(version,)] = await fetch(db, "PRAGMA user_version")
    return int(version)


async def migrate(db: aiosqlite.Connection, path: str) -> None:
    """Apply the migrations the file lacks, each in its own transaction; refuse a newer schema."""
    while True:
        version = await _user_version(db)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: schema version {version} is newer than this hsmscep knows"
                f" ({SCHEMA_VERSION}); refusing to open"
            )
        if version == SCHEMA_VERSION:
            return
        await fetch(db, "BEGIN IMMEDIATE")
        try:
            # Another worker may have migrated while we waited for the write lock.
            if await _user_version(db) != version:
                await rollback(db)
                continue
            for statement in MIGRATIONS[version]:
                await fetch(db, statement)
            await fetch(db, f"PRAGMA user_version = {version + 1}")
            await fetch(db, "COMMIT")
        except BaseException:
            await rollback(db)
            raise
        log.info("%s: migrated certificate store to schema version %d", path, version + 1)


class Database:
    """One store file: reads on the shared reader connection, rare writes in transactions of
    their own. `closed` set refuses both (the facade sets it when it starts closing)."""

    def __init__(self, path: str, reader: aiosqlite.Connection) -> None:
        self.path = path
        self._reader = reader
        self.closed = False

    async def read(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        """Rows of one query on the reader, which never sees an uncommitted batch."""
        if self.closed:
            raise StoreError("store is closed")
        try:
            return await fetch(self._reader, sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"certificate store read failed: {exc}") from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction (BEGIN IMMEDIATE) on a connection of its own, committed on exit."""
        # Not the group-commit writer's connection: its transactions span awaits, and these
        # writes are too rare to deserve a place in its queue. SQLite's busy timeout orders them.
        if self.closed:
            raise StoreError("store is closed")
        try:
            db = await connect(self.path, "FULL")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open certificate store {self.path}: {exc}") from exc
        try:
            await fetch(db, "BEGIN IMMEDIATE")
            try:
                yield db
                await fetch(db, "COMMIT")
            except BaseException:
                await rollback(db)
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"certificate store write failed: {exc}") from exc
        finally:
            await db.close()

    async def close(self) -> None:
        """Close the reader connection."""
        await self._reader.close()
