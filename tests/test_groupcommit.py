"""The group committer: batches from many threads, outcomes per item, failures, close."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from hsmscep.errors import StoreError
from hsmscep.store.groupcommit import GroupCommitter


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


def put(committer: GroupCommitter[int], item: int) -> None:
    """Submit `item` and wait for its outcome, raising it if it was not stored."""
    stored = threading.Event()
    outcome: list[BaseException | None] = []

    def done(error: BaseException | None) -> None:
        outcome.append(error)
        stored.set()

    committer.submit(item, done)
    stored.wait()
    if outcome[0] is not None:
        raise outcome[0]


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
    put(committer, 1)
    with pytest.raises(ValueError, match="refused -1"):
        put(committer, -1)
    with pytest.raises(StoreError, match="batch of 1 failed: disk full"):
        put(committer, -2)
    put(committer, 2)  # the committer keeps going after a failed batch
    committer.close()


def test_many_threads_every_item_committed_once() -> None:
    write = Recorder()
    committer = GroupCommitter(write, max_batch=16, on_failure=failed)
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(lambda item: put(committer, item), range(2000)))
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
    assert finished(closer)
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
    put(committer, 3)
    committer.close()
    assert seen == [2]


class Pipeline:
    """in_progress() for a committer: a count the test sets, as the signing pool's would be."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __call__(self) -> int:
        return self.count


LONG = 30.0  # a linger no test waits out: each finishes long before it, or fails its join


def finished(*threads: threading.Thread) -> bool:
    """Whether every thread ends within a bound no passing test comes near."""
    for thread in threads:
        thread.join(10)
    return not any(thread.is_alive() for thread in threads)


def lingering(in_progress: int) -> tuple[Recorder, GroupCommitter[int], Pipeline]:
    """A committer with a linger no test waits out, and the in-progress count it sees."""
    write, pipeline = Recorder(), Pipeline(in_progress)
    committer = GroupCommitter(write, max_batch=64, on_failure=failed, linger=LONG)
    committer.linger_for(pipeline)
    return write, committer, pipeline


def put_in_thread(committer: GroupCommitter[int], item: int) -> threading.Thread:
    thread = threading.Thread(target=put, args=(committer, item))
    thread.start()
    return thread


def test_a_batch_waits_for_the_items_in_progress_when_it_started() -> None:
    write, committer, pipeline = lingering(2)
    first = put_in_thread(committer, 1)
    assert write.writing.wait(0.3) is False  # item 1 waits for the two in progress
    # As the pool counts: a job leaves in_progress() just before it submits its row.
    pipeline.count = 1
    second = put_in_thread(committer, 2)
    assert write.writing.wait(0.3) is False  # still one to come
    pipeline.count = 0
    third = put_in_thread(committer, 3)
    assert finished(first, second, third)
    committer.close()
    assert write.batches == [[1, 2, 3]]


def test_a_lone_item_does_not_linger() -> None:
    write, committer, _ = lingering(0)
    thread = put_in_thread(committer, 1)
    assert finished(thread)
    committer.close()
    assert write.batches == [[1]]


def test_work_that_ends_without_an_item_ends_the_wait_for_it() -> None:
    write, committer, pipeline = lingering(1)
    thread = put_in_thread(committer, 1)
    assert write.writing.wait(0.3) is False
    pipeline.count = 0  # the request in progress was refused: it brings no row
    committer.wake()
    assert finished(thread)
    committer.close()
    assert write.batches == [[1]]


def test_new_arrivals_do_not_extend_the_wait_and_close_ends_it() -> None:
    write, committer, pipeline = lingering(1)
    first = put_in_thread(committer, 1)
    assert write.writing.wait(0.3) is False
    pipeline.count = 5  # five more arrive meanwhile: the batch still waits for one item only
    second = put_in_thread(committer, 2)
    assert finished(first, second)
    assert write.batches == [[1, 2]]
    waiting = put_in_thread(committer, 3)  # waits for the five "in progress"
    waiting.join(0.3)
    assert waiting.is_alive() and len(write.batches) == 1
    closer = threading.Thread(target=committer.close)
    closer.start()
    assert finished(waiting, closer)
    assert write.batches == [[1, 2], [3]]


def test_a_gathering_batch_is_woken_once_when_its_items_are_all_there() -> None:
    # Each wake-up of the committer is a GIL hand-off and a context switch: arrivals before
    # the last expected one must not wake it (the committer re-reads in_progress() on wake).
    write, committer, pipeline = lingering(3)
    reads = 0

    def counted() -> int:
        nonlocal reads
        reads += 1
        return pipeline.count

    committer.linger_for(counted)
    threads = [put_in_thread(committer, 1)]
    assert write.writing.wait(0.3) is False
    reads_while_waiting = reads
    for item in (2, 3):
        pipeline.count -= 1
        threads.append(put_in_thread(committer, item))
        threads[-1].join(0.3)  # still waiting for item 4
        assert threads[-1].is_alive() and reads == reads_while_waiting
    pipeline.count -= 1
    threads.append(put_in_thread(committer, 4))
    assert finished(*threads)
    committer.close()
    assert write.batches == [[1, 2, 3, 4]]
