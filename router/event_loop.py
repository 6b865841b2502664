"""Which asyncio event loop runs the router (router.event_loop).

uvloop (libuv) by default: it runs the router's event-loop machinery (ready callbacks, timers, fd
readers) in C, which cut the router's CPU per relayed token by about 15% and its p99 added latency
at 64 streams from about 2.1 to 1.4 ms in side-by-side runs (BENCHMARKS.md). "asyncio" selects
the standard library's loop, e.g. to rule uvloop out while debugging.
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
