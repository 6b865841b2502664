"""Fault: more requests than the pool can hold. A bounded queue refuses the excess at once with
RESOURCE_EXHAUSTED; a request that waits past the queue timeout or its own deadline ends with
DEADLINE_EXCEEDED and never reaches a worker; a burst of 10x capacity harms no accepted request.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc

from tests.fault_clients import (
    LiveStream,
    assert_complete,
    assert_failed,
    echo_settings,
    expected_text,
    request,
    run_streams,
    start_echo_pool,
    unique_prompt,
    wait_async,
)
from tests.harness import ProcessSet, inference_stub, start_worker, write_config
from tests.router_harness import expect_status, read_all, running_router

QUEUE_SIZE = 3
QUEUE_TIMEOUT_S = 3.0


async def overload(procs: ProcessSet, tmp_path: Path) -> None:
    config = write_config(tmp_path, echo_settings(tokens_per_second=20.0, tokens_per_request=400))
    async with running_router(
        heartbeat_interval_s=0.2, liveness=5, queue_size=QUEUE_SIZE, queue_timeout_s=QUEUE_TIMEOUT_S
    ) as router:
        workers = [start_worker(procs, config, dev_id, "--router", router.endpoint) for dev_id in (0, 1)]
        snapshot = router.server.snapshot
        await wait_async(lambda: snapshot().workers_idle == 2, "two workers registered")
        running = [router.stub.StreamComplete(request(unique_prompt("long"))) for _ in range(2)]
        for call in running:
            await call.read()
        queued = [router.stub.StreamComplete(request(unique_prompt("queued"))) for _ in range(QUEUE_SIZE)]
        await wait_async(lambda: snapshot().queued == QUEUE_SIZE, "the queue full")

        refused = router.stub.StreamComplete(request(unique_prompt("refused")))
        details = await expect_status(read_all(refused), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert f"the queue is full ({QUEUE_SIZE} requests waiting for a worker)" in details
        for call in queued:
            details = await expect_status(read_all(call), grpc.StatusCode.DEADLINE_EXCEEDED)
            assert f"no worker became free before the queue timeout ({QUEUE_TIMEOUT_S:g} s)" in details
            assert "the request was not started" in details
        own_deadline = router.stub.StreamComplete(request(unique_prompt("hurried")), timeout=0.5)
        await expect_status(read_all(own_deadline), grpc.StatusCode.DEADLINE_EXCEEDED)
        await wait_async(
            lambda: (snapshot().queued, snapshot().open_calls) == (0, 2), "only the long calls left"
        )

        for call in running:
            call.cancel()
        await wait_async(lambda: snapshot().workers_idle == 2 and snapshot().open_calls == 0, "the pool idle")
        # Only the two long requests ever reached a worker.
        assert sum(len(re.findall(r"request \w+: started", worker.log())) for worker in workers) == 2
        prompt = unique_prompt("after")
        frames = await read_all(router.stub.StreamComplete(request(prompt, max_new_tokens=3)))
        assert "".join(frame.output_text for frame in frames) == expected_text(prompt, 3)


def test_a_full_queue_refuses_at_once_and_waiting_too_long_never_reaches_a_worker(procs, tmp_path):
    asyncio.run(asyncio.wait_for(overload(procs, tmp_path), 75))


def test_a_burst_of_ten_times_capacity_harms_no_accepted_request_and_router_memory_stays_bounded(
    procs, tmp_path
):
    workers, queue_size = 2, 8
    capacity = workers + queue_size
    pool = start_echo_pool(procs, tmp_path, router={"queue_size": queue_size}, tokens_per_request=10)
    stub = inference_stub(pool.channel)
    router = pool.router_process()
    run_streams(stub, [unique_prompt("warm-up") for _ in range(capacity)])
    rss_before = router.memory_info().rss

    for burst in range(3):
        streams = [LiveStream(stub, unique_prompt(f"burst{burst}")) for _ in range(10 * capacity)]
        outcomes = [stream.result() for stream in streams]
        accepted = [outcome for outcome in outcomes if outcome.code != grpc.StatusCode.RESOURCE_EXHAUSTED]
        for outcome in accepted:
            assert_complete(outcome)
        for outcome in outcomes:
            if outcome not in accepted:
                assert_failed(outcome, grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full")
        assert len(accepted) >= capacity, f"burst {burst}: only {len(accepted)} accepted"
        assert len(accepted) < len(outcomes), f"burst {burst}: the queue bound never applied"
    growth_mib = (router.memory_info().rss - rss_before) / (1 << 20)
    assert growth_mib < 32, f"router RSS grew {growth_mib:.1f} MiB over three bursts"
    print("GROWTH", growth_mib)
