"""Pre-fill a store with N synthetic certificates, fast, for the large-store measurement.

    python -m bench.prefill --count 1000000 --sqlite work/hsmscep.db
    python -m bench.prefill --count 1000000 --postgresql postgresql://u@host/db  (password:
        HSMSCEP_STORE_PASSWORD)

Rows look like real ones (unique transactionIDs, ~1 KB of DER, not_after spread over a year)
and go in through the backend's own schema: the store is opened (created and migrated) by
hsmscep first, then rows are bulk-loaded in large transactions (SQLite: executemany;
PostgreSQL: COPY), and the load is written out to disk before returning. Serials are random
159-bit numbers, as in a store filled before hsmscep's serials were time-ordered (or imported
from another CA): the new, ordered serials then all go to one spot of that index. Prints rows/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from hsmscep.store.postgres import PgStore
from hsmscep.store.schema import iso, serial_key
from hsmscep.store.sqlite import CertStore

CHUNK = 50_000
COLUMNS = (
    "serial", "subject", "sans_json", "not_before", "not_after", "transaction_id",
    "requester_fingerprint", "public_key_sha256", "der", "status", "issued_at",
)  # fmt: skip
DER = secrets.token_bytes(1000)  # one blob: the size matters for the B-tree, not the bytes


def rows(count: int) -> Iterator[list[tuple[object, ...]]]:
    """Synthetic certificate rows in chunks."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    sans = json.dumps(["dns:prefill.example"])
    chunk: list[tuple[object, ...]] = []
    for i in range(count):
        issued = start + timedelta(seconds=i * 31 % 31_536_000)
        chunk.append(
            (
                serial_key(secrets.randbits(159) | 1),
                f"CN=prefill-{i},O=bench",
                sans,
                iso(issued),
                iso(issued + timedelta(days=365)),
                f"prefill-{i}-{secrets.token_hex(8)}",
                "ab" * 32,
                secrets.token_hex(32),
                DER,
                "issued",
                iso(issued),
            )
        )
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def prefill_sqlite(path: Path, count: int) -> None:
    await (await CertStore.open(path)).close()  # create and migrate
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = NORMAL")
        insert = f"INSERT INTO certificates ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 11)})"
        for chunk in rows(count):
            conn.execute("BEGIN")
            conn.executemany(insert, chunk)
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    settle()


async def prefill_postgresql(url: str, password: str | None, count: int) -> None:
    await (await PgStore.open(url, password=password)).close()  # create and migrate
    conn = await asyncpg.connect(url, password=password)
    try:
        for chunk in rows(count):
            await conn.copy_records_to_table("certificates", records=chunk, columns=COLUMNS)
        # As a store that grew over months has been: vacuumed (else autovacuum would work
        # through the million new rows during the measurement) and analysed.
        await conn.execute("VACUUM (ANALYZE) certificates")
    finally:
        await conn.close()
    # The server's dirty buffers are the caller's to flush (CHECKPOINT needs a superuser or
    # pg_checkpoint: bench/pgstore.py runs it), then settle().


def settle() -> None:
    """Write the bulk load out to disk now. Left to the kernel, a gigabyte of dirty pages is
    written back during the first measured phases and every fsync there waits behind it; a
    store that grew over months has no such backlog. (Two processes putting into a copy of a
    1M-row file: ~800 puts/s right after the copy, ~1,300-1,500/s once synced.)"""
    os.sync()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--sqlite", type=Path, help="the SQLite store file")
    target.add_argument("--postgresql", help="postgresql://user@host/db")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.sqlite is not None:
        asyncio.run(prefill_sqlite(args.sqlite, args.count))
    else:
        password = os.environ.get("HSMSCEP_STORE_PASSWORD")
        asyncio.run(prefill_postgresql(args.postgresql, password, args.count))
        settle()
    seconds = time.monotonic() - started
    print(f"{args.count} certificates in {seconds:.1f} s ({args.count / seconds:.0f}/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
