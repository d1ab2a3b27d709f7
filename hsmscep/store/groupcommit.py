"""Group commit on a thread of its own, fed from any thread.

`submit(item, done)` queues an item; the committer thread takes everything queued (up to
`max_batch`), writes and commits it in one transaction, then calls each item's `done` with its
outcome. While one COMMIT waits for its fsync the queue refills, so batches grow with load
and a lone item commits at once.

With `linger` set, a batch also waits, up to that long, for the items that were on their way
when it started: `in_progress()` counts them (requests queued or being signed in the pool).
Later arrivals do not extend the wait, and work that ends without an item (`wake()`) shortens
it. A lone request never waits; a batch under load waits about as long as the requests
already in the pipeline take. Under load a commit costs far more than its fsync: the write lock
passes between the server processes (the waiting one polls for it), every commit wakes
threads and moves the GIL on a busy core, and the event loop is woken per batch. Batches of
several rows instead of one took concurrency 32 from 564 to 687 enrollments/s and p99 from
81 to 69 ms on the 2-core box (bench/PROFILE.md).

A signing worker submits the certificate it just issued and goes on with the next request; the
committer completes the request's future once the row is durable. The event loop sees the
request once, when its answer is ready (bench/PROFILE.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from hsmscep.errors import StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Writes one batch and commits it; one outcome per item (None: stored), in order. Raising means
# nothing of the batch is stored.
WriteBatch = Callable[[list[T]], list[BaseException | None]]
Done = Callable[[BaseException | None], None]


class GroupCommitter(Generic[T]):
    """Commits items with `write`, at most `max_batch` per transaction, on its own thread."""

    # Every committer of the process reports (batch size, seconds, failed) here, on its
    # thread: the server's metrics set it once per process (web/lifespan.py).
    observer: Callable[[int, float, bool], None] | None = None

    def __init__(
        self,
        write: WriteBatch[T],
        *,
        max_batch: int,
        on_failure: Callable[[BaseException, int], BaseException],
        name: str = "group-commit",
        linger: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if linger < 0:
            raise ValueError("linger must not be negative")
        self._write = write
        self._max_batch = max_batch
        self._linger = linger
        self._in_progress: Callable[[], int] = _none
        self._on_failure = on_failure  # the error each item of a failed batch gets
        self._queue: deque[tuple[T, Done]] = deque()
        # Queued items that wake the committer: one while it idles; while a batch gathers, the
        # rest of its target (a wake-up per arrival cost a GIL hand-off and a context switch
        # per row on a core the signing worker needs).
        self._wanted = 1
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def linger_for(self, in_progress: Callable[[], int]) -> None:
        """Let a batch wait (up to `linger`) for the `in_progress()` items on their way when it
        started. `in_progress` runs on the committer thread: it must be cheap and thread-safe."""
        self._in_progress = in_progress

    def wake(self) -> None:
        """Re-count in_progress() now (some of that work ended without an item)."""
        with self._cond:
            self._cond.notify()

    def submit(self, item: T, done: Done) -> None:
        """Queue `item`; `done(None)` runs on the committer thread once it is committed, or
        `done(error)` if it was not stored."""
        with self._cond:
            if self._closed:
                raise StoreError("store is closed")
            self._queue.append((item, done))
            if len(self._queue) == self._wanted:
                self._cond.notify()

    def close(self) -> None:
        """Refuse new items, commit every queued one, stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed and drained
                batch = self._take(self._max_batch)
                if self._linger > 0:
                    self._gather(batch)
            outcomes = self._commit([item for item, _ in batch])
            for (_, done), outcome in zip(batch, outcomes, strict=True):
                try:
                    done(outcome)
                except Exception:  # a caller's bug must not stop the commits of the others
                    log.exception("group commit: completion callback failed")

    def _take(self, most: int) -> list[tuple[T, Done]]:
        return [self._queue.popleft() for _ in range(min(len(self._queue), most))]

    def _gather(self, batch: list[tuple[T, Done]]) -> None:
        # Called with the condition held; waiting releases it, so submits go on meanwhile.
        deadline = time.monotonic() + self._linger
        target = min(len(batch) + self._in_progress(), self._max_batch)
        while len(batch) < target and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if not self._queue:
                self._wanted = target - len(batch)
                self._cond.wait(remaining)
                self._wanted = 1
            batch += self._take(self._max_batch - len(batch))
            # Work that ended without an item lowers the count; new arrivals do not raise it.
            target = min(target, len(batch) + self._in_progress())

    def _commit(self, items: list[T]) -> list[BaseException | None]:
        started = time.perf_counter()
        try:
            outcomes = self._write(items)
        except Exception as exc:
            outcomes = [self._on_failure(exc, len(items)) for _ in items]
            failed = True
        else:
            failed = False
        observer = GroupCommitter.observer
        if observer is not None:
            observer(len(items), time.perf_counter() - started, failed)
        return outcomes


def _none() -> int:
    return 0


class CommitQueue(Generic[T]):
    """What a backend's issued-certificates part offers the service (put, submit, batch_with)
    over a GroupCommitter; the backend supplies `write` and says when it is `closed()`."""

    def __init__(
        self,
        write: WriteBatch[T],
        closed: Callable[[], bool],
        *,
        max_batch: int,
        on_failure: Callable[[BaseException, int], BaseException],
        linger: float,
    ) -> None:
        self._is_closed = closed
        self._committer: GroupCommitter[T] = GroupCommitter(
            write, max_batch=max_batch, on_failure=on_failure, name="store-commit", linger=linger
        )

    async def put(self, item: T) -> None:
        """Store item; return once the transaction holding it has committed."""
        if self._is_closed():
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, stored, error)

        self._committer.submit(item, done)
        await stored

    def batch_with(self, working: Callable[[], int]) -> Callable[[], None]:
        """Let a batch wait (up to the store's linger) for the `working()` rows being signed
        when it started. Returns what to call when some of that work ends without a row."""
        self._committer.linger_for(working)
        return self._committer.wake

    def submit(self, item: T, done: Done) -> None:
        """Queue item from any thread; `done(None)` runs on the commit thread once it is
        committed, `done(error)` (DuplicateSerial, DuplicateTransaction, StoreError) if not."""
        if self._is_closed():
            raise StoreError("store is closed")
        self._committer.submit(item, done)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.cancelled():
        return  # the caller gave up; the row is stored (or not) all the same
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
