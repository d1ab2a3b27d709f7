"""The signing pool: worker threads that each own one HSM context for life.

The aiosqlite pattern applied to PKCS#11: callers queue `(future, job)` pairs, a worker thread
runs `job(context)` with its own sessions and key handles, and hands the result back to the
event loop. python-pkcs11 releases the GIL inside C_* calls, so N threads keep N operations
in flight. Admission is bounded: past `max_pending` jobs the caller gets HsmBusy at once.
A job may hand its last step to another thread (Deferred): the certificate's commit runs on
the store's thread while the worker signs the next request.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar, cast

from hsmscep.errors import HsmBusy, HsmError, HsmUnavailable

log = logging.getLogger(__name__)

C = TypeVar("C", covariant=True)  # a pool of Keyrings serves jobs that want any KeySet
T = TypeVar("T")

_STOP = object()
JOB_TIMEOUT = 30.0  # seconds a caller waits for its job before answering 503

# How a deferred job reports its result: finish(result, None) or finish(None, error), once.
Finish = Callable[[Any, BaseException | None], None]


@dataclass(frozen=True, slots=True)
class Deferred:
    """What a job returns when another thread completes it (the store's committer, once the
    certificate is durable): the worker calls `start(finish)` and goes on with the next job."""

    start: Callable[[Finish], None]


class SigningPool(Generic[C]):
    """`size` threads; each builds its context with `open_context()` on its own thread."""

    def __init__(
        self,
        open_context: Callable[[], C],
        *,
        size: int,
        max_pending: int,
        close_context: Callable[[C], None] | None = None,
        stale: Callable[[C], bool] | None = None,
        wait_observer: Callable[[], Callable[[float], None]] | None = None,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        """The metrics: each worker thread calls `wait_observer()` once for the observer of
        its jobs' time in the queue; `on_reject()` runs for each job refused at admission."""
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self._open_context = open_context
        self._close_context = close_context
        self.job_timeout = JOB_TIMEOUT
        self._stale = stale  # a context to reopen before its next job (tokens changed)
        self._size = size
        self._max_pending = max_pending
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pending = 0
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        # Finished jobs wait here for the event loop; one wake-up serves every job that
        # finished before the loop got to them (a wake-up is a syscall and a context switch).
        self._done: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]]
        self._done = collections.deque()
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        # Jobs queued or running (not those waiting for a deferred finish): handed out on the
        # event loop, counted back by the workers.
        self._handed_out = 0
        self._returned = 0
        self._count_lock = threading.Lock()
        self._job_end_hooks: list[Callable[[], None]] = []
        self._wait_observer = wait_observer
        self._on_reject = on_reject

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def size(self) -> int:
        return self._size

    def queued(self) -> int:
        """Jobs waiting for a worker thread (approximate; any thread)."""
        return self._queue.qsize()

    def working(self) -> int:
        """Jobs queued or running on a worker (not those waiting for a deferred finish);
        callable from any thread."""
        return self._handed_out - self._returned

    def on_job_end(self, hook: Callable[[], None]) -> None:
        """Call `hook()` on the worker thread after every job that did not return Deferred
        (a job that deferred reports through its own finish)."""
        self._job_end_hooks.append(hook)

    async def start(self) -> None:
        """Start the threads and wait until every one has opened its context."""
        errors = await self._spawn(range(self._size))
        if errors:
            await self.aclose()
            raise errors[0]

    async def grow(self, size: int) -> None:
        """Add threads up to `size` (the default size, once the HSM's latency is known); a
        thread that cannot open its context is logged and left out."""
        added = range(len(self._threads), size)
        errors = await self._spawn(added)
        self._size = len(self._threads) - len(errors)
        if errors:
            log.warning(
                "%d of %d added signing threads failed: %s", len(errors), len(added), errors[0]
            )

    async def _spawn(self, indices: range) -> list[BaseException]:
        loop = asyncio.get_running_loop()
        ready: list[asyncio.Future[None]] = []
        for index in indices:
            fut: asyncio.Future[None] = loop.create_future()
            thread = threading.Thread(
                target=self._work, args=(loop, fut), name=f"hsm-worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
            ready.append(fut)
        results = await asyncio.gather(*ready, return_exceptions=True)
        return [r for r in results if isinstance(r, BaseException)]

    async def run(self, job: Callable[[C], T]) -> T:
        """Run `job(context)` on a worker thread; raise HsmBusy when the pool is saturated."""
        if self._closed:
            raise HsmError("signing pool is shut down")
        # working(): jobs a caller gave up on (timed out) still hold a thread or a queue slot.
        if self._pending >= self._max_pending or self.working() >= self._max_pending:
            if self._on_reject is not None:
                self._on_reject()
            raise HsmBusy("signing queue full")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._pending += 1
        self._idle.clear()
        # A hung HSM call (a link that drops packets) must not hold the request forever.
        expiry = loop.call_later(self.job_timeout, _expire, fut, self.job_timeout)
        try:
            self._handed_out += 1
            # The job runs in the caller's context: its log lines carry the request id.
            context = contextvars.copy_context()
            self._queue.put((fut, lambda keys: context.run(job, keys), time.perf_counter()))
            return await fut
        finally:
            expiry.cancel()
            self._pending -= 1
            if not self._pending:
                self._idle.set()

    async def run_deferred(self, job: Callable[[C], T | Deferred]) -> T:
        """run() for a job that may return Deferred: then the result is what its `start`
        reports, from whichever thread finishes the work."""
        return cast(T, await self.run(job))

    async def aclose(self) -> None:
        """Stop admitting work, let queued jobs finish, then close every context."""
        if self._closed:
            return
        self._closed = True
        await self._idle.wait()
        for _ in self._threads:
            self._queue.put(_STOP)
        await asyncio.gather(*(asyncio.to_thread(t.join) for t in self._threads))
        self._threads.clear()

    def _work(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            context: C | None = self._open_context()
        except BaseException as exc:  # report to start(); the thread has nothing to do
            loop.call_soon_threadsafe(_settle, ready, None, exc)
            return
        loop.call_soon_threadsafe(_settle, ready, None, None)
        observe_wait = self._wait_observer() if self._wait_observer is not None else None
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            fut, job, queued_at = cast(
                tuple[asyncio.Future[object], Callable[[C], object], float], item
            )
            if observe_wait is not None:
                observe_wait(time.perf_counter() - queued_at)
            context, result, error = self._run_job(context, job)
            with self._count_lock:
                self._returned += 1
            if isinstance(result, Deferred):
                try:
                    result.start(partial(self._complete, loop, fut))
                    continue
                except BaseException as exc:
                    result, error = None, exc
            self._complete(loop, fut, result, error)
            for hook in self._job_end_hooks:
                hook()
        if context is not None:
            self._discard(context)

    def _run_job(
        self, context: C | None, job: Callable[[C], object]
    ) -> tuple[C | None, object, BaseException | None]:
        """Run `job`, reopening a missing or stale context first; the new context back."""
        if context is not None and self._stale is not None and self._stale(context):
            self._discard(context)
            context = None
        for attempt in range(2):
            if context is None:
                context, reason = self._reopen()
                if context is None:
                    return None, None, reason
            try:
                return context, job(context), None
            except HsmError as exc:
                # The session may be dead (device removed, token logged out): drop it and
                # reopen instead of failing every request after this one.
                self._discard(context)
                context = None
                if attempt or not isinstance(exc, HsmUnavailable):
                    return None, None, exc
                # The token went away mid-job: one more try on a fresh context (another
                # replica, or the token logged in again). A job has no effect outside the HSM
                # until it returns, so running it again issues nothing twice.
            except BaseException as exc:
                return context, None, exc
        raise AssertionError("unreachable")

    def _complete(
        self,
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[Any],
        result: object,
        error: BaseException | None,
    ) -> None:
        self._done.append((fut, result, error))
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._wake_lock:
            self._wake_pending = False
        while self._done:
            _settle(*self._done.popleft())

    def _reopen(self) -> tuple[C | None, HsmError]:
        try:
            return self._open_context(), HsmUnavailable("HSM session unavailable")
        except HsmError as exc:
            # Once per job while the HSM is gone: TokenLogin logs the transitions.
            log.debug("reopening HSM context failed: %s", exc)
            return None, exc
        except Exception as exc:
            log.warning("reopening HSM context failed: %s", exc)
            return None, HsmUnavailable(f"HSM session unavailable: {exc}")

    def _discard(self, context: object) -> None:
        if self._close_context is not None:
            try:
                self._close_context(cast(C, context))
            except Exception as exc:
                log.debug("closing HSM context failed: %s", exc)


def _expire(fut: asyncio.Future[Any], seconds: float) -> None:
    if not fut.done():
        # The job may still finish on its thread: _settle then finds the future done.
        fut.set_exception(HsmUnavailable(f"the HSM did not answer within {seconds:g} s"))


def _settle(fut: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if fut.done():  # cancelled, or expired
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)  # type: ignore[arg-type]


# Below this share of a job spent waiting on the HSM, extra threads cost more in GIL hand-offs
# than the idle CPU they fill (one vs two sessions per process on SoftHSM2: bench/PROFILE.md).
# A fixed ratio to one operation's CPU misjudged slow boxes: 1 ms of round trip against 2.2 ms
# of CPU per operation was called local and left 30 % of the CPU idle (-25 % enrollments/s).
LOCAL_IDLE_SHARE = 0.1


def latency_hiding_size(
    base: int, cpu_op: float, wait_op: float, *, cap: int, outside: float = 0.001
) -> int:
    """Signing threads per process that keep the CPU busy while operations wait on the HSM.

    `base` threads keep the cores busy when an operation is all CPU (SoftHSM2). A job costs
    about three operations' CPU plus `outside` (HTTP, CMS, the store hand-off) and waits three
    round trips, so by Little's law base * (cpu + wait) / cpu threads keep the same CPU busy;
    twice that absorbs the spread of round trips. Capped at `cap` (sessions are finite).
    The pool stays at `base` while the round trips would idle the CPU for less than
    LOCAL_IDLE_SHARE of a job: a local token, where more threads only contend for the GIL.
    """
    job_cpu = 3 * cpu_op + outside
    job_wall = job_cpu + 3 * wait_op
    if 3 * wait_op < LOCAL_IDLE_SHARE * job_wall:
        return base
    return min(max(cap, base), max(base, math.ceil(2 * base * job_wall / job_cpu)))
