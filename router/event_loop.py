"""Which asyncio event loop runs the router (router.event_loop).

uvloop (libuv) by default: it runs the router's event-loop machinery (ready callbacks, timers, fd
readers) in C; in side-by-side runs it took a few percent off the router's CPU and about a third off
the p99 added latency at 256 streams (BENCHMARKS.md). "asyncio" selects the standard library's
loop, e.g. to rule uvloop out while debugging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

_LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {  # by common.config.EVENT_LOOPS
    "uvloop": uvloop.new_event_loop,
    "asyncio": None,  # asyncio.Runner's default
}

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], event_loop: str) -> T:
    """asyncio.run(main) on the named event loop."""
    with asyncio.Runner(loop_factory=_LOOP_FACTORIES[event_loop]) as runner:
        return runner.run(main)
