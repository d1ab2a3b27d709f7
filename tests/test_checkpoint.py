"""WAL checkpoints run on their own thread, not inside the group commit's COMMIT."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

from hsmscep.store.checkpoint import WRITER_AUTOCHECKPOINT, WalCheckpointer
from hsmscep.store.sqlite import CertStore


def _filled_wal(path: Path, rows: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (b BLOB)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?)", [(os.urandom(1000),) for _ in range(rows)])
    conn.execute("COMMIT")
    return conn


def test_checkpointer_copies_the_wal_into_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.db"
    writer = _filled_wal(path, 500)
    try:
        before = path.stat().st_size
        assert before < 100_000  # everything is still in the WAL
        checkpointer = WalCheckpointer(str(path), interval=0.05)
        try:
            deadline = time.monotonic() + 10
            while path.stat().st_size < 500_000 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            checkpointer.close()
        assert path.stat().st_size >= 500_000
        [(count,)] = writer.execute("SELECT COUNT(*) FROM t").fetchall()
        assert count == 500
    finally:
        writer.close()


def test_checkpointer_stops_and_survives_a_missing_directory(tmp_path: Path) -> None:
    checkpointer = WalCheckpointer(str(tmp_path / "gone" / "x.db"), interval=0.01)
    time.sleep(0.1)  # a few failed attempts: logged, never raised out of the thread
    assert checkpointer._thread.is_alive()  # survived them
    checkpointer.close()
    assert not checkpointer._thread.is_alive()


def test_store_writer_leaves_checkpoints_to_the_thread(tmp_path: Path) -> None:
    async def main() -> int:
        store = await CertStore.open(tmp_path / "s.db")
        try:
            [(pages,)] = store._certificates._writer.execute("PRAGMA wal_autocheckpoint").fetchall()
            assert store._certificates._checkpointer._thread.is_alive()
            return int(pages)
        finally:
            await store.close()

    assert asyncio.run(main()) == WRITER_AUTOCHECKPOINT
