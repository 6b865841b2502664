"""Fault: a storm of client cancels. 200 streams, each cancelled at a random point (while queued,
before its first token, mid-stream), against three real worker processes.

The router runs in the test process (the real RouterServer, on this test's event loop), so the
test can read its internal counts (RouterServer.snapshot()) and count its live Job objects.
"""

from __future__ import annotations

import asyncio
import gc
import random
import re
from pathlib import Path

import grpc

from router.job import Job
from tests.fault_clients import echo_settings, expected_text, request, unique_prompt, wait_async
from tests.harness import ProcessSet, start_worker, write_config
from tests.router_harness import RouterUnderTest, read_all, running_router

STREAMS = 200
WORKERS = 3


async def cancelled_stream(router: RouterUnderTest, rng: random.Random) -> str:
    """One client: cancels after a random delay or a random number of frames; returns its text."""
    prompt = unique_prompt("storm")
    call = router.stub.StreamComplete(request(prompt))
    text = ""
    if rng.random() < 0.4:
        await asyncio.sleep(rng.uniform(0.0, 0.5))  # queued, starting or streaming: whatever it is
    else:
        for _ in range(rng.randrange(1, 6)):
            frame = await call.read()
            if frame is grpc.aio.EOF:
                break
            text += frame.output_text
    call.cancel()
    assert expected_text(prompt, 10_000).startswith(text), f"{prompt} received {text!r}"
    return text


def idle(router: RouterUnderTest) -> bool:
    snapshot = router.server.snapshot()
    return (snapshot.queued, snapshot.running, snapshot.open_calls) == (0, 0, 0) and (
        snapshot.workers_idle,
        snapshot.workers_busy,
        snapshot.workers_lost,
    ) == (WORKERS, 0, 0)


async def storm(procs: ProcessSet, tmp_path: Path) -> None:
    config = write_config(tmp_path, echo_settings(tokens_per_second=50.0, tokens_per_request=20))
    async with running_router(heartbeat_interval_s=0.2, liveness=5) as router:
        workers = [
            start_worker(procs, config, dev_id, "--router", router.endpoint) for dev_id in range(WORKERS)
        ]
        await wait_async(lambda: router.server.snapshot().workers_idle == WORKERS, "three workers registered")

        rng = random.Random(4)
        texts = await asyncio.gather(*(cancelled_stream(router, rng) for _ in range(STREAMS)))
        assert any(texts) and not all(texts), "the storm should cancel both before and after output"

        await wait_async(
            lambda: idle(router), f"no call, queue entry or busy worker left: {router.server.snapshot()}"
        )
        gc.collect()
        assert [obj for obj in gc.get_objects() if isinstance(obj, Job)] == [], "Job objects leaked"

        # Every generation a worker started, it ended (most of them cancelled); the pool still serves.
        for worker in workers:
            log = worker.log()
            started = set(re.findall(r"request (\w+): started", log))
            done = set(re.findall(r"request (\w+): done, ", log))
            assert started == done, f"{worker.name} never finished {started - done}"
        assert sum(worker.log().count("cancel received") for worker in workers) > 0
        prompts = [unique_prompt("after") for _ in range(WORKERS)]
        calls = [router.stub.StreamComplete(request(prompt, max_new_tokens=4)) for prompt in prompts]
        for prompt, call in zip(prompts, calls, strict=True):
            frames = await read_all(call)
            assert "".join(frame.output_text for frame in frames) == expected_text(prompt, 4)
            assert frames[-1].finished


def test_a_cancel_storm_leaves_every_worker_idle_and_nothing_behind_in_the_router(procs, tmp_path):
    asyncio.run(asyncio.wait_for(storm(procs, tmp_path), 100))
