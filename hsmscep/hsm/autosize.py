"""Growing the default signing pool at run time while HSM round trips leave the CPU idle.

The start-up measurement (pool.latency_hiding_size) sizes the pool from a few timed
operations; on a busy box they overstate the CPU an operation needs, and a network HSM's round
trip may grow later (a failover to a remote partition). So, for a token found to make threads
wait, a controller watches the pool once a second: when jobs queue for a free thread in most
samples while this process leaves its CPU idle, the threads, not the CPU, are the limit: it
adds what would fill the CPU by Little's law, at most doubling per step, never past the jobs
seen in flight or the cap. It never shrinks: idle threads cost a session and some memory,
and the cap bounds both.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from hsmscep.hsm.pool import SigningPool

log = logging.getLogger(__name__)

SAMPLE_S = 0.05  # how often the queue is looked at
WINDOW_S = 1.0  # one decision per window
QUEUED_SHARE = 0.5  # jobs waited for a thread in at least this share of the samples
# And the process used less than this share of one core: the GIL lets a process's Python run
# on about one core however many it may use (the default runs one process per core).
CPU_IDLE_BELOW = 0.85


def next_size(size: int, cap: int, queued_share: float, cpu_share: float, demand: int) -> int:
    """The pool size for the next window. When the threads were the bottleneck and the CPU
    was not: size x CPU_IDLE_BELOW / cpu_share (busy threads scale the CPU they use), at least
    one more, at most twice `size`, `demand` (the most jobs seen in flight) and `cap`."""
    if size >= cap or queued_share < QUEUED_SHARE or cpu_share >= CPU_IDLE_BELOW:
        return size
    by_cpu = math.ceil(size * CPU_IDLE_BELOW / max(cpu_share, 0.01))
    return max(size, min(cap, demand, 2 * size, max(size + 1, by_cpu)))


async def keep_sized(pool: SigningPool[Any], cap: int, *, window: float = WINDOW_S) -> None:
    """Run until cancelled or at `cap`: grow `pool` by next_size() once per window."""
    samples = max(1, round(window / SAMPLE_S))
    while pool.size < cap:
        wall0, cpu0 = time.monotonic(), time.process_time()
        queued = demand = 0
        for _ in range(samples):
            await asyncio.sleep(window / samples)
            working = pool.working()
            queued += working > pool.size
            demand = max(demand, working)
        wall = time.monotonic() - wall0
        cpu_share = (time.process_time() - cpu0) / wall if wall > 0 else 1.0
        wanted = next_size(pool.size, cap, queued / samples, cpu_share, demand)
        if wanted > pool.size:
            before = pool.size
            await pool.grow(wanted)
            log.info(
                "signing threads %d -> %d: jobs waited for a thread while the CPU was %d %% busy",
                before,
                pool.size,
                round(100 * cpu_share),
            )
            if pool.size <= before:
                return  # no thread could open a session: leave it to the operator
