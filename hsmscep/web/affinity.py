"""One server process per CPU: pin each worker process to a CPU of its own.

With `--workers auto` every process runs its event loop, its signing worker and its store
thread, and the three hand work to each other for every request. Left to the scheduler they
migrate between the cores and wake each other across them; pinned, a process's hand-offs stay
on one core with warm caches. Measured on the 2-core box: +3 % enrollments/s at concurrency 32
(bench/PROFILE.md). Pinning is only done when there are exactly as many processes as CPUs the
server may run on, so it never stacks two processes on one core while another idles.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV = "HSMSCEP_PIN_CPUS"  # the CPU list, set by `hsmscep serve` for its worker processes


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask: cgroups and taskset narrow it)."""
    return sorted(os.sched_getaffinity(0))


def worker_processes(configured: int) -> int:
    """Server processes to run: `configured`, or 0 ("auto") for one per usable CPU."""
    return configured or len(usable_cpus())


def should_pin(enabled: bool, workers: int, cpus: int) -> bool:
    """Whether `workers` processes on `cpus` CPUs get one CPU each."""
    return enabled and workers > 1 and workers == cpus


def cpu_for(slot: int, cpus: list[int]) -> int:
    """The CPU of the process holding connection-table slot `slot`.

    A replacement worker claims the lowest free slot, which is its predecessor's once that
    one has exited, and so gets its CPU. Spare slots (beyond the worker count) wrap around.
    """
    return cpus[slot % len(cpus)]


def pin_process(cpu: int) -> None:
    """Pin every thread of this process to `cpu` (threads started later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:
            pass  # the thread ended meanwhile
    log.info("worker process %d pinned to CPU %d", os.getpid(), cpu)
