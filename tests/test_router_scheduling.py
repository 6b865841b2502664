"""Router scheduling: FIFO, least recently used idle worker, one request per worker, queue bound
and queue timeouts. Real router, real gRPC clients, emulated workers on real ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import logging

import grpc

from protos import inference_pb2
from tests.router_harness import (
    EmulatedWorker,
    async_test,
    background,
    eventually,
    expect_status,
    read_all,
    request,
    running_router,
    workers,
)


@async_test
async def test_a_request_streams_the_workers_chunks_as_completions():
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        call, generate = await router.started_stream(worker, "你好", temperature=0.0, max_new_tokens=20)
        assert generate.history[0].content == "你好"
        assert generate.params.HasField("temperature") and generate.params.temperature == 0.0
        assert not generate.params.HasField("top_p")  # absent stays absent: the worker's default
        worker.chunk(generate.request_id, "你好", 1, created_unix_nanos=1_700_000_000_123_456_789)
        worker.chunk(generate.request_id, "!", 2)
        worker.chunk(generate.request_id, "", 3, finish=2)  # FINISH_LENGTH
        frames = await read_all(call)
    assert "".join(frame.output_text for frame in frames) == "你好!"
    assert [frame.token_usage for frame in frames] == sorted({frame.token_usage for frame in frames})
    assert [frame.finished for frame in frames] == [False] * (len(frames) - 1) + [True]
    assert frames[-1].finish_reason == inference_pb2.LENGTH
    assert all(frame.finish_reason == inference_pb2.UNKNOWN for frame in frames[:-1])
    assert {frame.model_id for frame in frames} == {"test-model"}
    assert {frame.worker_id for frame in frames} == {"w1"}
    assert {frame.prompt_tokens for frame in frames} == {7}
    assert frames[0].create_time.ToNanoseconds() == 1_700_000_000_123_456_789
    assert frames[-1].create_time.seconds > 0  # no worker time given: the router's clock


@async_test
async def test_queued_requests_are_served_in_arrival_order():
    async with running_router() as router:
        calls = [await router.queued_stream(prompt) for prompt in ("first", "second", "third")]
        async with workers(router.endpoint, "w1") as (worker,):
            for prompt, call in zip(("first", "second", "third"), calls, strict=True):
                generate = await worker.next_generate()
                assert generate.history[0].content == prompt
                await worker.serve(generate, [prompt.upper()])
                assert "".join(frame.output_text for frame in await read_all(call)) == prompt.upper()
            assert worker.overlaps == []


@async_test
async def test_the_least_recently_used_idle_worker_gets_the_next_request():
    async with running_router() as router, workers(router.endpoint, "w1", "w2") as (w1, w2):
        call_a = router.stream("a")
        generate_a = await w1.next_generate()  # w1 registered first: idle the longest
        call_b, generate_b = await router.started_stream(w2, "b")
        await w2.serve(generate_b, ["B"])  # w2 becomes idle first ...
        await read_all(call_b)
        await w1.serve(generate_a, ["A"])  # ... then w1
        await read_all(call_a)
        call_c = router.stream("c")
        assert (await w2.next_generate()).history[0].content == "c"
        call_d = router.stream("d")
        assert (await w1.next_generate()).history[0].content == "d"
        for call in (call_c, call_d):
            call.cancel()


@async_test
async def test_more_requests_than_workers_never_share_a_worker_and_all_complete():
    async with running_router() as router, workers(router.endpoint, "w1", "w2") as pool:

        async def serve_forever(worker: EmulatedWorker) -> None:
            while True:
                generate = await worker.next_generate()
                content = generate.history[0].content
                await worker.serve(generate, [content, "/", worker.worker_id])

        prompts = [f"q{index}" for index in range(12)]
        async with background(*(serve_forever(worker) for worker in pool)):
            answers = await asyncio.gather(*(read_all(router.stream(prompt)) for prompt in prompts))
        for prompt, frames in zip(prompts, answers, strict=True):
            text = "".join(frame.output_text for frame in frames)
            assert text == f"{prompt}/{frames[-1].worker_id}"
        assert {frames[-1].worker_id for frames in answers} == {"w1", "w2"}
        assert all(worker.overlaps == [] for worker in pool)
        await eventually(lambda: router.server.snapshot().workers_idle == 2, "both workers idle")


@async_test
async def test_a_request_waits_for_a_worker_that_registers_later():
    async with running_router() as router:
        call = await router.queued_stream("early")
        async with workers(router.endpoint, "late") as (worker,):
            generate = await worker.next_generate()
            await worker.serve(generate, ["ok"])
            assert (await read_all(call))[-1].worker_id == "late"


@async_test
async def test_a_full_queue_refuses_new_calls_with_resource_exhausted():
    async with running_router(queue_size=2) as router:
        waiting = [router.stream("a"), router.stream("b")]
        await eventually(lambda: router.server.snapshot().queued == 2, "two requests queued")
        details = await expect_status(read_all(router.stream("c")), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "queue is full" in details
        async with workers(router.endpoint, "w1") as (worker,):
            for _ in waiting:
                await worker.serve(await worker.next_generate(), ["done"])
            for call in waiting:
                assert (await read_all(call))[-1].finished


@async_test
async def test_a_request_waiting_past_the_queue_timeout_fails_and_never_reaches_a_worker(caplog):
    caplog.set_level(logging.INFO, logger="router.calls")
    async with running_router(queue_timeout_s=0.3) as router:
        details = await expect_status(read_all(router.stream("too late")), grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "queue timeout" in details and "not started" in details
        await eventually(
            lambda: "StreamComplete DEADLINE_EXCEEDED, finish none, worker -" in caplog.text, "the log"
        )
        assert router.server.snapshot().queued == 0
        await router.assert_the_next_request_reaches_a_worker()


@async_test
async def test_a_request_waiting_past_its_grpc_deadline_never_reaches_a_worker():
    async with running_router(queue_timeout_s=30.0) as router:
        call = router.stub.StreamComplete(
            inference_pb2.CompletionRequest(history=[inference_pb2.ChatMessage(role=1, content="hurry")]),
            timeout=0.3,
        )
        await expect_status(read_all(call), grpc.StatusCode.DEADLINE_EXCEEDED)
        await eventually(lambda: router.server.snapshot().queued == 0, "the queue emptied")
        await router.assert_the_next_request_reaches_a_worker()


@async_test
async def test_a_request_waiting_past_its_grpc_deadline_is_told_why_before_the_client_gives_up():
    async with running_router(queue_timeout_s=30.0) as router:
        streamed = router.stub.StreamComplete(request("hurry"), timeout=3.0)
        completed = router.stub.Complete(request("hurry too"), timeout=3.0)
        expired = grpc.StatusCode.DEADLINE_EXCEEDED
        for details in await asyncio.gather(
            expect_status(read_all(streamed), expired), expect_status(completed, expired)
        ):
            assert details == "no worker became free before the call's deadline: the request was not started"


@async_test
async def test_complete_returns_the_concatenated_stream_in_one_completion():
    pieces = ["Hello", ",", " wor", "ld", "."]
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        stream_call = router.stream("hi")
        await worker.serve(await worker.next_generate(), pieces)
        streamed = await read_all(stream_call)
        complete_call = router.stub.Complete(request("hi"))
        await worker.serve(await worker.next_generate(), pieces)
        completion = await complete_call
    assert completion.output_text == "".join(frame.output_text for frame in streamed) == "Hello, world."
    assert completion.token_usage == streamed[-1].token_usage == len(pieces)
    assert completion.finished and completion.finish_reason == inference_pb2.STOP
    assert streamed[-1].finish_reason == inference_pb2.STOP
    assert completion.worker_id == "w1" and completion.model_id == "test-model"
    assert completion.prompt_tokens == 7
