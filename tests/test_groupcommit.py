"""The group committer: batches from many threads, outcomes per item, failures, close."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from hsmscep.errors import StoreError
from hsmscep.groupcommit import GroupCommitter


class Recorder:
    """A write function that records its batches; item -1 is refused, item -2 fails the batch."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate
        self.writing = threading.Event()

    def __call__(self, items: list[int]) -> list[BaseException | None]:
        self.writing.set()
        if self.gate is not None:
            self.gate.wait(10)
        if -2 in items:
            raise OSError("disk full")
        self.batches.append(list(items))
        return [ValueError(f"refused {i}") if i == -1 else None for i in items]


def failed(exc: BaseException, size: int) -> BaseException:
    return StoreError(f"batch of {size} failed: {exc}")


def test_items_queued_during_a_commit_go_into_the_next_batch_up_to_max_batch() -> None:
    gate = threading.Event()
    write = Recorder(gate)
    committer = GroupCommitter(write, max_batch=4, on_failure=failed)
    done: list[tuple[int, BaseException | None]] = []
    lock = threading.Lock()

    def record(item: int) -> None:
        def callback(error: BaseException | None) -> None:
            with lock:
                done.append((item, error))

        committer.submit(item, callback)

    record(0)  # taken alone; the write then waits on the gate while the others queue up
    assert write.writing.wait(10)
    for item in range(1, 10):
        record(item)
    gate.set()
    committer.close()
    assert write.batches[0] == [0]
    assert write.batches[1:] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert sorted(done) == [(i, None) for i in range(10)]


def test_each_caller_gets_its_own_outcome_and_a_failed_batch_fails_all_of_it() -> None:
    committer = GroupCommitter(Recorder(), max_batch=64, on_failure=failed)
    committer.put(1)
    with pytest.raises(ValueError, match="refused -1"):
        committer.put(-1)
    with pytest.raises(StoreError, match="batch of 1 failed: disk full"):
        committer.put(-2)
    committer.put(2)  # the committer keeps going after a failed batch
    committer.close()


def test_many_threads_every_item_committed_once() -> None:
    write = Recorder()
    committer = GroupCommitter(write, max_batch=16, on_failure=failed)
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(committer.put, range(2000)))
    committer.close()
    flat = [item for batch in write.batches for item in batch]
    assert sorted(flat) == list(range(2000))
    assert max(len(batch) for batch in write.batches) <= 16


def test_close_commits_what_is_queued_then_refuses_new_items() -> None:
    gate = threading.Event()
    write = Recorder(gate)
    committer = GroupCommitter(write, max_batch=8, on_failure=failed)
    outcomes: list[BaseException | None] = []
    for item in range(5):
        committer.submit(item, outcomes.append)
    closer = threading.Thread(target=committer.close)
    closer.start()
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert sorted(i for batch in write.batches for i in batch) == [0, 1, 2, 3, 4]
    assert outcomes == [None] * 5
    with pytest.raises(StoreError, match="closed"):
        committer.submit(5, outcomes.append)


def test_a_failing_callback_does_not_stop_the_others() -> None:
    committer = GroupCommitter(Recorder(), max_batch=8, on_failure=failed)
    seen: list[int] = []

    def broken(_: BaseException | None) -> None:
        raise RuntimeError("caller bug")

    committer.submit(1, broken)
    committer.submit(2, lambda error: seen.append(2))
    committer.put(3)
    committer.close()
    assert seen == [2]
