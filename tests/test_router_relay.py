"""Relaying worker chunks to clients: coalescing for a lagging client, and the error mapping
documented in router/service.py."""

from __future__ import annotations

import asyncio

import grpc

from protos import inference_pb2, worker_pb2
from router.job import MAX_UPDATE_CHARS, Job, JobFailed
from tests.router_harness import (
    EmulatedWorker,
    RouterUnderTest,
    async_test,
    eventually,
    expect_status,
    read_all,
    request,
    running_router,
    workers,
)


def chunk(text: str, tokens: int, finish: int = worker_pb2.FINISH_NONE, created: int = 0) -> worker_pb2.Chunk:
    return worker_pb2.Chunk(
        request_id="r", text=text, completion_tokens=tokens, prompt_tokens=3, finish_reason=finish,
        created_unix_nanos=created,
    )  # fmt: skip


@async_test
async def test_chunks_that_pile_up_are_taken_as_one_update():
    job = Job("r", worker_pb2.Generate())
    job.push(chunk("a", 1, created=100))
    job.push(chunk("b", 2, created=200))
    job.push(chunk("c", 3, created=300))
    update = await job.next_update()
    assert (update.text, update.completion_tokens, update.prompt_tokens) == ("abc", 3, 3)
    assert update.created_unix_nanos == 100  # the oldest text in the update
    assert not update.final and job.delivered
    job.push(chunk("d", 4, finish=worker_pb2.FINISH_STOP, created=400))
    final = await job.next_update()
    assert (final.text, final.completion_tokens, final.final, final.created_unix_nanos) == ("d", 4, True, 400)


@async_test
async def test_text_without_a_new_token_waits_for_the_next_frame():
    job = Job("r", worker_pb2.Generate())
    job.push(chunk("a", 1))
    assert (await job.next_update()).text == "a"
    job.push(chunk("b", 1))  # same count: no frame of its own, token_usage must grow
    waiting = asyncio.create_task(job.next_update())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiting.done()
    job.push(chunk("c", 2))
    update = await waiting
    assert (update.text, update.completion_tokens) == ("bc", 2)


@async_test
async def test_an_update_of_a_far_behind_client_is_cut_between_chunks_to_bound_the_frame():
    job = Job("r", worker_pb2.Generate())
    half = MAX_UPDATE_CHARS // 2 + 1
    job.push(chunk("a" * half, 1))
    job.push(chunk("b" * half, 2))
    job.push(chunk("c" * half, 2))  # no new token: it cannot start a frame of its own
    job.push(chunk("d" * half, 3, finish=worker_pb2.FINISH_STOP))
    updates = [await job.next_update() for _ in range(3)]
    assert [(update.text[0], len(update.text), update.completion_tokens) for update in updates] == [
        ("a", half, 1),
        ("b", half, 2),
        ("c", 2 * half, 3),  # "c" rides with the next token, over the bound: token_usage must grow
    ]
    assert [update.final for update in updates] == [False, False, True]
    assert job.done


@async_test
async def test_repeated_cuts_for_a_far_behind_client_keep_every_frame_within_the_bound():
    job = Job("r", worker_pb2.Generate())
    third = MAX_UPDATE_CHARS // 3
    sizes = [MAX_UPDATE_CHARS - 2 * third, third, third] * 3  # three parts fill a frame exactly
    for tokens, size in enumerate(sizes, start=1):
        job.push(chunk(str(tokens) * size, tokens, created=100 * tokens))
    job.push(chunk("", 10, finish=worker_pb2.FINISH_STOP, created=1000))
    updates = [await job.next_update() for _ in range(3)]
    assert [(len(update.text), update.completion_tokens) for update in updates] == [
        (MAX_UPDATE_CHARS, 3),
        (MAX_UPDATE_CHARS, 6),
        (MAX_UPDATE_CHARS, 10),  # the rest fits in one frame: it goes with the final chunk
    ]
    assert "".join(update.text for update in updates) == "".join(
        str(n) * size for n, size in enumerate(sizes, start=1)
    )
    assert [update.prompt_tokens for update in updates] == [3, 3, 3]
    assert [update.error_message for update in updates] == ["", "", ""]
    assert [update.final for update in updates] == [False, False, True]
    # Only the first cut knows when its oldest text was made; the later ones say "unknown" (0).
    assert [update.created_unix_nanos for update in updates] == [100, 0, 0]


@async_test
async def test_a_failed_job_with_a_backlog_over_the_bound_raises_at_once():
    job = Job("r", worker_pb2.Generate())
    for tokens in range(1, 4):
        job.push(chunk("x" * MAX_UPDATE_CHARS, tokens))
    job.fail(grpc.StatusCode.UNAVAILABLE, "worker gone")
    try:
        update = await job.next_update()
    except JobFailed as failure:
        assert failure.message == "worker gone"
    else:
        raise AssertionError(f"a failed job handed out {len(update.text)} more characters")


@async_test
async def test_an_error_chunk_without_a_message_still_says_what_failed():
    job = Job("r", worker_pb2.Generate())
    job.push(worker_pb2.Chunk(request_id="r", completion_tokens=0, finish_reason=worker_pb2.FINISH_ERROR))
    update = await job.next_update()
    assert (update.error_kind, update.error_message) == (
        worker_pb2.ERROR_ENGINE,
        "the engine failed without a message",
    )


@async_test
async def test_complete_takes_the_whole_answer_however_long():
    job = Job("r", worker_pb2.Generate())
    job.push(chunk("a" * MAX_UPDATE_CHARS, 1))
    job.push(chunk("b" * MAX_UPDATE_CHARS, 2, finish=worker_pb2.FINISH_LENGTH))
    whole = await job.result()
    assert len(whole.text) == 2 * MAX_UPDATE_CHARS and whole.completion_tokens == 2 and whole.final


@async_test
async def test_a_failed_job_raises_its_status_and_drops_pending_text():
    job = Job("r", worker_pb2.Generate())
    job.push(chunk("lost", 1))
    job.fail(grpc.StatusCode.UNAVAILABLE, "worker gone")
    try:
        await job.next_update()
    except JobFailed as failure:
        assert (failure.code, failure.message) == (grpc.StatusCode.UNAVAILABLE, "worker gone")
    else:
        raise AssertionError("a failed job must raise")


@async_test
async def test_a_client_that_does_not_read_gets_the_whole_text_in_fewer_frames():
    piece = "字" * 700  # 2.1 kB of UTF-8 per chunk, 8 MB in all: far beyond gRPC's flow-control windows
    count = 4000
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        call, generate = await router.started_stream(worker, "talk a lot")
        for tokens in range(1, count + 1):
            worker.chunk(generate.request_id, piece, tokens)
            if tokens % 100 == 0:
                await asyncio.sleep(0)
        worker.chunk(generate.request_id, "", count + 1, finish=worker_pb2.FINISH_STOP)
        # The router received everything (the worker is free again) before the client read a byte.
        await eventually(lambda: router.server.snapshot().workers_idle == 1, "the worker free again")
        frames = await read_all(call)
    assert "".join(frame.output_text for frame in frames) == piece * count
    assert len(frames) < count
    assert max(len(frame.output_text) for frame in frames) <= MAX_UPDATE_CHARS
    usage = [frame.token_usage for frame in frames]
    assert usage == sorted(set(usage)) and usage[-1] == count + 1
    assert [frame.finished for frame in frames].count(True) == 1 and frames[-1].finished


async def statuses_of_an_error_before_any_frame(
    router: RouterUnderTest, worker: EmulatedWorker, error_kind: int, message: str, code: grpc.StatusCode
) -> list[str]:
    """A streamed and then a unary call, each answered by the worker with an error chunk before any
    text; each must fail with `code`. The status details of both."""
    details = []
    for start in (lambda: read_all(router.stream("x")), lambda: router.stub.Complete(request("x"))):
        call = asyncio.ensure_future(start())
        generate = await worker.next_generate()
        worker.chunk(generate.request_id, "", 0, error_kind=error_kind, error_message=message)
        details.append(await expect_status(call, code))
    return details


@async_test
async def test_a_request_the_worker_refuses_ends_with_invalid_argument():
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        details = await statuses_of_an_error_before_any_frame(
            router,
            worker,
            worker_pb2.ERROR_INVALID_REQUEST,
            "the last user turn alone (9000 tokens) exceeds the context (4096)",
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    assert len(details) == 2 and all("exceeds the context" in detail for detail in details)


@async_test
async def test_an_engine_error_before_any_frame_is_an_internal_status():
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        details = await statuses_of_an_error_before_any_frame(
            router, worker, worker_pb2.ERROR_ENGINE, "chip OOM", grpc.StatusCode.INTERNAL
        )
        assert details == ["chip OOM", "chip OOM"]
        assert router.server.snapshot().workers_idle == 1  # the worker serves the next request


@async_test
async def test_an_engine_error_after_frames_ends_the_stream_with_an_error_frame():
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        call, generate = await router.started_stream(worker, "x")
        worker.chunk(generate.request_id, "Hel", 1)
        first = await call.read()
        worker.chunk(generate.request_id, "lo", 2)
        worker.chunk(
            generate.request_id, "", 2, finish=worker_pb2.FINISH_ERROR, error_kind=worker_pb2.ERROR_ENGINE,
            error_message="step 3 failed: device error",
        )  # fmt: skip
        rest = await read_all(call)
        assert await call.code() == grpc.StatusCode.OK
    frames = [first, *rest]
    assert "".join(frame.output_text for frame in frames[:-1]) == "Hello"
    last = frames[-1]
    assert last.finished and last.finish_reason == inference_pb2.ERROR
    assert last.output_text == "step 3 failed: device error"
    assert [frame.finished for frame in frames].count(True) == 1
