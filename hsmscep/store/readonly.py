"""A store opened only to read it, for `hsmscep status`: no migration, no group commit, and
the database itself refuses writes (SQLite mode=ro and query_only; PostgreSQL a read-only
transaction). Safe beside running servers: a read never blocks their commits.

A schema other than this hsmscep's is refused rather than guessed at: a newer one may mean
something else, an older one lacks columns until a server migrates it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import asyncpg

from hsmscep.errors import StoreError
from hsmscep.store.backends import is_postgres
from hsmscep.store.pgdatabase import CONNECT_TIMEOUT, CONNECTION_ERRORS, redact, store_error
from hsmscep.store.records import StoreStats
from hsmscep.store.schema import SCHEMA_VERSION
from hsmscep.store.stats import fold, queries


class NoStore(StoreError):
    """The SQLite file does not exist yet: no server has opened it."""


async def read_stats(
    location: str | os.PathLike[str], *, password: str | None, now: datetime, days: int
) -> StoreStats:
    """The StoreStats of the store at `location` (an SQLite path or a postgresql:// URL)."""
    queries("sqlite", now, days)  # a bad `days` fails before anything is opened
    if is_postgres(location):
        return await _postgres(str(location), password, now, days)
    return await asyncio.to_thread(_sqlite, Path(location), now, days)


def _check_version(version: int, where: str) -> None:
    if version == 0:
        raise StoreError(f"{where} holds no hsmscep store (schema version 0)")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{where}: schema version {version} is newer than this hsmscep knows"
            f" ({SCHEMA_VERSION}); use the hsmscep version the servers run"
        )
    if version < SCHEMA_VERSION:
        raise StoreError(
            f"{where}: schema version {version} is older than this hsmscep's ({SCHEMA_VERSION});"
            " it is migrated when `hsmscep serve` of this version starts"
        )


def _sqlite(path: Path, now: datetime, days: int) -> StoreStats:
    if not path.is_file():
        raise NoStore(f"{path} does not exist yet (the server creates it when it starts)")
    try:
        # mode=ro: SQLite itself refuses writes; as root it gives the -wal/-shm files it may
        # create the database's owner, so the server can still open them.
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path} to read it: {exc}") from exc
    try:
        db.execute("PRAGMA query_only = ON")
        db.execute("PRAGMA busy_timeout = 5000")
        [(version,)] = db.execute("PRAGMA user_version").fetchall()
        _check_version(int(version), str(path))
        db.execute("BEGIN")  # one snapshot for every statement
        rows = [db.execute(sql, p).fetchall() for sql, p in queries("sqlite", now, days)]
        db.execute("COMMIT")
        return fold(rows, now, days)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    finally:
        db.close()


async def _postgres(url: str, password: str | None, now: datetime, days: int) -> StoreStats:
    where = redact(url)
    try:
        conn = await asyncpg.connect(
            url,
            password=password,
            timeout=CONNECT_TIMEOUT,
            command_timeout=60,
            server_settings={"default_transaction_read_only": "on"},
        )
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise store_error(f"cannot connect to {where}", exc) from exc
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            try:
                version = await conn.fetchval("SELECT version FROM hsmscep_schema WHERE id = 1")
            except asyncpg.UndefinedTableError:
                version = 0
            _check_version(int(version or 0), where)
            rows = [await conn.fetch(sql, *p) for sql, p in queries("postgresql", now, days)]
        return fold(rows, now, days)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise store_error(f"cannot read {where}", exc) from exc
    finally:
        await conn.close()
