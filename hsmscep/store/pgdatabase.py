"""The PostgreSQL database: the connection pool, bringing the schema up to date, reads and
short write transactions, and the one place asyncpg's errors become StoreError.

A database that is gone (restarted, unreachable) is StoreError, which the web layer answers
with 503 and Retry-After; the pool replaces closed connections on the next acquire, so service
resumes by itself once the database is back.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from hsmscep.errors import StoreError
from hsmscep.store.pgschema import MIGRATE_LOCK, PG_MIGRATIONS, VERSION_TABLE
from hsmscep.store.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds to open one connection
COMMAND_TIMEOUT = 15.0  # seconds for one statement

# The failures that mean "the database is not there right now", as opposed to a refusal.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionFailureError,
)


def redact(url: str) -> str:
    """The URL without a password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def store_error(what: str, exc: BaseException) -> StoreError:
    """A StoreError for a failed database call (its text never carries the password)."""
    error = StoreError(f"{what}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


async def connect(url: str, password: str | None) -> Any:
    """One asyncpg connection (the group-commit writer's and the migration's)."""
    return await asyncpg.connect(
        url, password=password, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT
    )


async def create_pool(url: str, password: str | None, size: int) -> Any:
    """The pool the reads and rare writes share."""
    return await asyncpg.create_pool(
        url,
        password=password,
        # No floor: asyncpg would keep reconnecting (and logging tracebacks) in the background
        # while the database is gone; connections are opened when a request needs one.
        min_size=0,
        max_size=size,
        timeout=CONNECT_TIMEOUT,
        command_timeout=COMMAND_TIMEOUT,
    )


async def migrate(conn: Any, where: str) -> None:
    """Apply the steps the database lacks, in one transaction under an advisory lock, so nodes
    starting together migrate once; refuse a schema newer than this hsmscep knows."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
        await conn.execute(VERSION_TABLE)
        version = await conn.fetchval("SELECT version FROM hsmscep_schema WHERE id = 1")
        if version is None:
            await conn.execute("INSERT INTO hsmscep_schema (id, version) VALUES (1, 0)")
            version = 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{where}: schema version {version} is newer than this hsmscep knows"
                f" ({SCHEMA_VERSION}); refusing to open"
            )
        for step in range(version, SCHEMA_VERSION):
            for statement in PG_MIGRATIONS[step]:
                await conn.execute(statement)
            log.info("%s: migrated certificate store to schema version %d", where, step + 1)
        if version < SCHEMA_VERSION:
            await conn.execute(
                "UPDATE hsmscep_schema SET version = $1 WHERE id = 1", SCHEMA_VERSION
            )


class PgDatabase:
    """One PostgreSQL database: reads and rare write transactions on the pool. `closed` set
    refuses both (the facade sets it when it starts closing)."""

    def __init__(self, where: str, pool: Any) -> None:
        self.where = where
        self._pool = pool
        self.closed = False

    async def read(self, sql: str, *args: object) -> list[Any]:
        """Rows of one query; retried once on a fresh connection if the first one was dead."""
        if self.closed:
            raise StoreError("store is closed")
        for attempt in (1, 2):
            try:
                return list(await self._pool.fetch(sql, *args))
            except CONNECTION_ERRORS as exc:
                if attempt == 2:
                    raise store_error("certificate store unavailable", exc) from exc
            except asyncpg.PostgresError as exc:
                raise store_error("certificate store read failed", exc) from exc
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """A write transaction on a pooled connection, committed on exit."""
        if self.closed:
            raise StoreError("store is closed")
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                yield conn
        except CONNECTION_ERRORS as exc:
            raise store_error("certificate store unavailable", exc) from exc
        except asyncpg.PostgresError as exc:
            raise store_error("certificate store write failed", exc) from exc

    @asynccontextmanager
    async def session_lock(self, key: int) -> AsyncIterator[None]:
        """Hold the cluster-wide advisory lock `key` (waiting for it) while the block runs."""
        if self.closed:
            raise StoreError("store is closed")
        try:
            async with self._pool.acquire() as conn:
                await conn.execute("SELECT pg_advisory_lock($1)", key)
                try:
                    yield
                finally:
                    if not conn.is_closed():
                        await conn.execute("SELECT pg_advisory_unlock($1)", key)
        except CONNECTION_ERRORS as exc:
            raise store_error("certificate store unavailable", exc) from exc
        except asyncpg.PostgresError as exc:
            raise store_error("certificate store lock failed", exc) from exc

    async def close(self) -> None:
        """Close the pool's connections."""
        await self._pool.close()
