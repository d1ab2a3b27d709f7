"""The signing pool's bookkeeping, with a plain object as the worker context (no HSM)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hsmscep.errors import HsmBusy, HsmUnavailable
from hsmscep.hsm.pool import Deferred, Finish, SigningPool

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_working_counts_queued_and_running_jobs_not_deferred_ones() -> None:
    pool: SigningPool[object] = SigningPool(object, size=1, max_pending=8)
    ended: list[int] = []
    pool.on_job_end(lambda: ended.append(pool.working()))
    await pool.start()
    gate = threading.Event()
    seen: list[int] = []

    def blocked(_: object) -> str:
        seen.append(pool.working())  # itself and the one queued behind it
        gate.wait(10)
        return "first"

    def deferred(_: object) -> Deferred:
        seen.append(pool.working())

        def start(finish: Finish) -> None:
            seen.append(pool.working())  # a deferred job no longer counts as working
            threading.Thread(target=finish, args=("later", None)).start()

        return Deferred(start)

    try:
        first = asyncio.ensure_future(pool.run(blocked))
        second = asyncio.ensure_future(pool.run_deferred(deferred))
        await asyncio.sleep(0.05)
        assert pool.working() == 2
        gate.set()
        assert await first == "first"
        assert await second == "later"
        assert pool.working() == 0
    finally:
        await pool.aclose()
    assert seen == [2, 1, 0]
    assert ended == [1]  # after the first job only: the deferred one reports by its finish


async def test_an_error_in_start_fails_the_job_and_the_count_recovers() -> None:
    pool: SigningPool[object] = SigningPool(object, size=1, max_pending=8)
    await pool.start()

    def broken(_: object) -> Deferred:
        def start(finish: Finish) -> None:
            raise RuntimeError("store is closed")

        return Deferred(start)

    try:
        try:
            await pool.run_deferred(broken)
        except RuntimeError as exc:
            assert "store is closed" in str(exc)
        else:
            raise AssertionError("the job did not fail")
        assert pool.working() == 0
        assert await pool.run(lambda _: 7) == 7
    finally:
        await pool.aclose()


async def test_a_hung_job_answers_unavailable_and_holds_its_slot() -> None:
    pool: SigningPool[object] = SigningPool(object, size=1, max_pending=1)
    pool.job_timeout = 0.2
    await pool.start()
    gate = threading.Event()
    try:
        with pytest.raises(HsmUnavailable, match="did not answer"):
            await pool.run(lambda _: gate.wait(10))
        # The hung job still holds the only slot: the next caller is refused at once.
        with pytest.raises(HsmBusy):
            await pool.run(lambda _: "next")
        gate.set()
        for _ in range(100):  # bounded: the slot frees once the job ends
            if pool.working() == 0:
                break
            await asyncio.sleep(0.02)
        assert await pool.run(lambda _: "next") == "next"
    finally:
        gate.set()
        await pool.aclose()
