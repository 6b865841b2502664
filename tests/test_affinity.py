"""How numpy workers share the cores."""

from __future__ import annotations

import pytest

from worker.affinity import core_share


@pytest.mark.parametrize(
    ("slot", "threads", "cores", "share"),
    [
        (0, 1, [0, 1], [0]),
        (1, 1, [0, 1], [1]),
        (1, 2, [0, 1, 2, 3], [2, 3]),
        (0, 2, [7, 3, 5, 9], [3, 5]),  # the cores this process may use, in order
        (2, 1, [0, 1], [0]),  # more slots than cores (oversubscription allowed): wrap around
        (0, 4, [0, 1], [0, 1]),
    ],
)
def test_each_slot_gets_its_own_run_of_cores(slot, threads, cores, share):
    assert core_share(slot, threads, cores) == share


def test_slots_within_the_budget_never_share_a_core():
    cores = range(8)
    shares = [set(core_share(slot, 2, cores)) for slot in range(4)]
    assert set().union(*shares) == set(cores)
    assert sum(len(share) for share in shares) == 8
