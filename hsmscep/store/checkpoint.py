"""WAL checkpoints off the commit path: a thread that copies the WAL into the database file.

SQLite's default checkpoints on the connection whose COMMIT pushes the WAL past 1,000 pages,
inside that COMMIT: the batch's requests wait while pages are copied into the main file and it
is synced. In a large store those pages are spread over the file (index leaves), so in a two
process bench with a million stored certificates the writers spent most of their time there
(bench/PROFILE.md, "A million certificates"). Here a thread of each server process runs a
PASSIVE checkpoint every CHECKPOINT_INTERVAL seconds on a connection of its own: it never waits
for a lock and never blocks a writer; pages rewritten many times in between are copied once.
The writer keeps a far larger automatic threshold as a backstop should these threads fall
behind or stop.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 1.0  # seconds
# The writer's own checkpoint threshold (pages, about 40 MB of WAL): reached only if the
# checkpoint threads cannot keep up, since a WAL that grows without bound slows every read.
WRITER_AUTOCHECKPOINT = 10_000


class WalCheckpointer:
    """A daemon thread checkpointing the WAL of `path` every `interval` seconds until close()."""

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL) -> None:
        self._path, self._interval = path, interval
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread (after the checkpoint it is running, if any) and wait for it."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while not self._stop.wait(self._interval):
                try:
                    if conn is None:
                        conn = sqlite3.connect(self._path, isolation_level=None)
                    self._checkpoint(conn)
                except sqlite3.Error as exc:
                    # The writer's backstop still bounds the WAL; say so once per outage.
                    if not self._failing:
                        log.warning("WAL checkpoint of %s failed: %s", self._path, exc)
                    self._failing = True
                    if conn is not None:
                        conn.close()
                        conn = None
        finally:
            if conn is not None:
                conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        # PASSIVE: copy what no reader still needs, without waiting; a checkpoint another
        # process is running at the same moment makes this one a no-op (busy = 1).
        busy, wal_pages, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if self._failing:
            log.warning("WAL checkpoints of %s work again", self._path)
            self._failing = False
        log.debug("WAL checkpoint: busy %d, %d pages in the WAL, %d copied", busy, wal_pages, done)
