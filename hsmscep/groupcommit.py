"""Group commit on a thread of its own, fed from any thread.

`submit(item, done)` queues an item; the committer thread takes everything queued (up to
`max_batch`), writes and commits it in one transaction, then calls each item's `done` with its
outcome. While one COMMIT waits for its fsync the queue refills, so batches grow with load
and a lone item commits at once.

A signing worker submits the certificate it just issued and goes on with the next request; the
committer completes the request's future once the row is durable. The event loop sees the
request once, when its answer is ready (bench/PROFILE.md).
"""

from __future__ import annotations

import logging
import threading
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

    def __init__(
        self,
        write: WriteBatch[T],
        *,
        max_batch: int,
        on_failure: Callable[[BaseException, int], BaseException],
        name: str = "group-commit",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._write = write
        self._max_batch = max_batch
        self._on_failure = on_failure  # the error each item of a failed batch gets
        self._queue: deque[tuple[T, Done]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T, done: Done) -> None:
        """Queue `item`; `done(None)` runs on the committer thread once it is committed, or
        `done(error)` if it was not stored."""
        with self._cond:
            if self._closed:
                raise StoreError("store is closed")
            self._queue.append((item, done))
            if len(self._queue) == 1:
                self._cond.notify()

    def put(self, item: T) -> None:
        """submit() and wait: for threads that have nothing else to do meanwhile."""
        finished = threading.Event()
        outcome: list[BaseException | None] = []

        def done(error: BaseException | None) -> None:
            outcome.append(error)
            finished.set()

        self.submit(item, done)
        finished.wait()
        if outcome[0] is not None:
            raise outcome[0]

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
                batch = [
                    self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))
                ]
            outcomes = self._commit([item for item, _ in batch])
            for (_, done), outcome in zip(batch, outcomes, strict=True):
                try:
                    done(outcome)
                except Exception:  # a caller's bug must not stop the commits of the others
                    log.exception("group commit: completion callback failed")

    def _commit(self, items: list[T]) -> list[BaseException | None]:
        try:
            return self._write(items)
        except Exception as exc:
            return [self._on_failure(exc, len(items)) for _ in items]
