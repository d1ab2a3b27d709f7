"""Copying an SQLite store into PostgreSQL (`hsmscep store migrate`), then proving the copy.

Every table moves: certificates (with their revocations), the revocation revision, CRLs, held
requests (keeping their ids) and one-time challenges. Rows already in the target are kept, and
what changed in the source since an earlier run (a revocation, a decision, a used challenge)
is brought over, so the command is safe to rerun. Then each table's row count and a SHA-256
over its rows in key order are compared on both sides; a difference is a StoreError.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from hsmscep.errors import StoreError
from hsmscep.store.pgdatabase import CONNECTION_ERRORS, connect, redact, store_error
from hsmscep.store.postgres import PgStore
from hsmscep.store.sqlite import CertStore

CHUNK = 5000


@dataclass(frozen=True)
class Table:
    name: str
    key: str
    columns: tuple[str, ...]
    upsert: str  # the ON CONFLICT clause of the copy


TABLES = (
    Table(
        "certificates",
        "serial",
        (
            "serial", "subject", "sans_json", "not_before", "not_after", "transaction_id",
            "requester_fingerprint", "public_key_sha256", "der", "status", "issued_at",
            "revoked_at", "revocation_reason",
        ),
        # A revocation made in the source since the last run is carried over.
        "ON CONFLICT (serial) DO UPDATE SET status = EXCLUDED.status,"
        " revoked_at = EXCLUDED.revoked_at, revocation_reason = EXCLUDED.revocation_reason"
        " WHERE certificates.revoked_at IS NULL AND EXCLUDED.revoked_at IS NOT NULL",
    ),
    Table(
        "crls", "number", ("number", "revision", "this_update", "next_update", "der"),
        "ON CONFLICT (number) DO NOTHING",
    ),
    Table(
        "pending_requests",
        "id",
        (
            "id", "transaction_id", "csr_der", "requester_fingerprint", "requester_key_sha256",
            "requester_ip", "subject", "sans_json", "key_description", "created_at", "status",
            "decided_at", "profile",
        ),
        "ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status,"
        " decided_at = EXCLUDED.decided_at",
    ),
    Table(
        "challenges",
        "hash",
        (
            "hash", "profile", "subject_pattern", "san_pattern", "created_at", "expires_at",
            "used_at", "used_by",
        ),
        "ON CONFLICT (hash) DO UPDATE SET used_at = EXCLUDED.used_at, used_by = EXCLUDED.used_by"
        " WHERE challenges.used_at IS NULL",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Checked:
    """One table after the copy: its rows on both sides and whether their digests agree."""

    table: str
    copied: int  # rows in the source
    target: int
    source_digest: str
    target_digest: str

    @property
    def ok(self) -> bool:
        return self.copied == self.target and self.source_digest == self.target_digest


def _field(value: object) -> bytes:
    if value is None:
        return b"\x00"
    data = (
        bytes(value) if isinstance(value, bytes | bytearray | memoryview) else str(value).encode()
    )
    return len(data).to_bytes(4, "big") + data


class _Digest:
    """SHA-256 over rows in key order, each field length-prefixed (NULL distinct from '')."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.count = 0

    def add(self, row: Sequence[object]) -> None:
        self._hash.update(b"".join(_field(value) for value in row))
        self.count += 1

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _source_rows(path: str, table: Table) -> Iterator[list[tuple[Any, ...]]]:
    # Advanced chunk by chunk from executor threads, one at a time.
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    try:
        cursor = conn.execute(
            f"SELECT {', '.join(table.columns)} FROM {table.name} ORDER BY {table.key}"
        )
        while rows := cursor.fetchmany(CHUNK):
            yield rows
    finally:
        conn.close()


async def _target_rows(conn: Any, table: Table) -> AsyncIterator[Sequence[object]]:
    # COLLATE "C": byte order, as SQLite sorts text, whatever the database's locale.
    order = f'{table.key} COLLATE "C"' if table.key in ("serial", "hash") else table.key
    query = f"SELECT {', '.join(table.columns)} FROM {table.name} ORDER BY {order}"
    async with conn.transaction():
        async for row in conn.cursor(query, prefetch=CHUNK):
            yield tuple(row)


async def _copy_table(path: str, conn: Any, table: Table) -> str:
    """Copy `table` through a temporary table; return the source's digest."""
    digest = _Digest()
    columns = ", ".join(table.columns)
    async with conn.transaction():
        await conn.execute(
            f"CREATE TEMPORARY TABLE incoming (LIKE {table.name} INCLUDING DEFAULTS) ON COMMIT DROP"
        )
        chunks = _source_rows(path, table)
        while (rows := await asyncio.to_thread(next, chunks, None)) is not None:
            for row in rows:
                digest.add(row)
            await conn.copy_records_to_table("incoming", records=rows, columns=table.columns)
        await conn.execute(
            f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM incoming {table.upsert}"
        )
    return digest.hexdigest()


async def _verify(conn: Any, table: Table, source_digest: str, source_count: int) -> Checked:
    digest = _Digest()
    async for row in _target_rows(conn, table):
        digest.add(row)
    return Checked(table.name, source_count, digest.count, source_digest, digest.hexdigest())


def _source_counts(path: str) -> tuple[dict[str, int], int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        counts = {
            t.name: int(conn.execute(f"SELECT COUNT(*) FROM {t.name}").fetchone()[0])
            for t in TABLES
        }
        [(revision,)] = conn.execute("SELECT revision FROM revocation_state").fetchall()
        return counts, int(revision)
    finally:
        conn.close()


async def migrate_store(source: Path, url: str, password: str | None) -> list[Checked]:
    """Copy the SQLite store at `source` into the PostgreSQL database at `url` and verify it.

    Both sides are first brought to the current schema (the source refuses if it is newer).
    Returns one Checked per table; raises StoreError if any differs."""
    if not source.is_file():
        raise StoreError(f"{source}: no such SQLite store")
    await (await CertStore.open(source)).close()  # migrates an older source file
    await (await PgStore.open(url, password=password)).close()
    where = str(source)
    counts, revision = await asyncio.to_thread(_source_counts, where)
    try:
        conn = await connect(url, password)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise store_error(f"cannot open {redact(url)}", exc) from exc
    try:
        digests = {t.name: await _copy_table(where, conn, t) for t in TABLES}
        await conn.execute(
            "UPDATE revocation_state SET revision = GREATEST(revision, $1)", revision
        )
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('pending_requests', 'id'),"
            " GREATEST((SELECT MAX(id) FROM pending_requests), 1))"
        )
        checked = [await _verify(conn, t, digests[t.name], counts[t.name]) for t in TABLES]
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise store_error(f"copying into {redact(url)} failed", exc) from exc
    finally:
        await conn.close()
    bad = [c for c in checked if not c.ok]
    if bad:
        raise StoreError(
            "the copy differs from the source: "
            + "; ".join(
                f"{c.table}: {c.copied} rows in the source, {c.target} in the target" for c in bad
            )
            + " (was the target already in use?)"
        )
    return checked
