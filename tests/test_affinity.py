"""Which worker process gets which CPU (pure)."""

from __future__ import annotations

import pytest

from hsmscep.web.affinity import cpu_for, should_pin


@pytest.mark.parametrize(
    ("enabled", "workers", "cpus", "expected"),
    [
        (True, 2, 2, True),
        (True, 4, 4, True),
        (True, 1, 1, False),  # a lone process needs no pinning: it may use every CPU
        (True, 2, 4, False),  # fewer processes than CPUs: pinned ones would leave CPUs idle
        (True, 3, 2, False),  # more: two processes would share a CPU while none moves
        (False, 2, 2, False),
    ],
)
def test_pin_only_with_one_process_per_cpu(
    enabled: bool, workers: int, cpus: int, expected: bool
) -> None:
    assert should_pin(enabled, workers, cpus) is expected


def test_each_slot_gets_its_own_cpu_and_spare_slots_wrap_around() -> None:
    cpus = [2, 3, 5]  # an affinity mask need not start at 0 nor be contiguous
    assert [cpu_for(slot, cpus) for slot in range(3)] == [2, 3, 5]
    assert [cpu_for(slot, cpus) for slot in range(3, 6)] == [2, 3, 5]
