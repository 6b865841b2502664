"""CPU budget of a numpy worker: BLAS threads and the share of cores it is pinned to.

Several CPU workers on one machine must not fight over cores: worker slot s with t threads gets
cores [s*t, s*t + t) of the cores this process may use (wrapping when oversubscription is allowed).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def limit_blas_threads(threads: int) -> None:
    """Must run before numpy is imported: BLAS libraries read these once, when they load."""
    for name in BLAS_THREAD_VARIABLES:
        os.environ[name] = str(threads)


def core_share(slot: int, threads: int, cores: Iterable[int]) -> list[int]:
    ordered = sorted(cores)
    return sorted({ordered[(slot * threads + k) % len(ordered)] for k in range(threads)})


def pin_to_core_share(slot: int, threads: int) -> list[int]:
    share = core_share(slot, threads, os.sched_getaffinity(0))
    os.sched_setaffinity(0, share)
    return share
