"""The registry's side of cache-aware dispatch, with a real router (gRPC, ZeroMQ, HTTP) and emulated
workers: what workers report in their Hello and final chunks steers the choice of idle worker,
an error's empty report clears it, and x-session-id (gRPC metadata or HTTP header) travels to the
worker in the Generate."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from common import wire
from common.config import HttpConfig
from common.prefix_hash import conversation_hashes
from protos import inference_pb2, worker_pb2
from router.server import RouterServer
from router.validation import RequestLimits
from tests.router_harness import (
    async_test,
    free_port,
    read_all,
    router_config,
    running_router,
    unregistered_worker,
    workers,
)

SYSTEM = "You are a helpful assistant."


def turn_two() -> inference_pb2.CompletionRequest:
    history = [
        inference_pb2.ChatMessage(role=1, content="first question"),
        inference_pb2.ChatMessage(role=2, content="first answer"),
        inference_pb2.ChatMessage(role=1, content="second question"),
    ]
    return inference_pb2.CompletionRequest(system_message=SYSTEM, history=history)


def held_after_turn_one() -> list[int]:
    turns = [
        worker_pb2.Turn(role=1, content="first question"),
        worker_pb2.Turn(role=2, content="first answer"),
    ]
    return conversation_hashes(SYSTEM, turns)


def hello(worker_id: str, held: list[int]) -> worker_pb2.Hello:
    return worker_pb2.Hello(
        protocol_version=wire.PROTOCOL_VERSION,
        worker_id=worker_id,
        model_id="test-model",
        context_size=4096,
        pid=1,
        held_prefix=held,
    )


@async_test
async def test_a_hello_that_reports_a_conversation_gets_its_next_turn():
    async with running_router() as router, contextlib.AsyncExitStack() as stack:
        (lru,) = await stack.enter_async_context(workers(router.endpoint, "w1"))
        holder = await stack.enter_async_context(unregistered_worker(router.endpoint, "w2"))
        holder.send(hello("w2", held_after_turn_one()))
        await holder.next("welcome")
        call = router.stub.StreamComplete(turn_two())
        generate = await holder.next_generate()
        assert lru.pending("generate") == 0, "the least recently used worker was passed over"
        await holder.serve(generate, ["ok"])
        await read_all(call)


@async_test
async def test_final_chunks_update_what_a_worker_holds():
    async with running_router() as router, workers(router.endpoint, "w1", "w2") as (first, second):
        # w1 (least recently used) serves turn one and reports holding it, with its answer.
        call = router.stub.StreamComplete(turn_two())
        generate = await first.next_generate()
        first.send(
            worker_pb2.Chunk(
                request_id=generate.request_id,
                text="x",
                completion_tokens=1,
                finish_reason=worker_pb2.FINISH_STOP,
                held_prefix=held_after_turn_one(),
            )
        )
        await read_all(call)
        # w2 is now the least recently used, yet turn two goes back to w1, which then fails: an
        # engine error resets its cache and reports nothing held.
        call = router.stub.StreamComplete(turn_two())
        generate = await first.next_generate()
        first.chunk(generate.request_id, "", 0, error_kind=worker_pb2.ERROR_ENGINE, error_message="boom")
        with contextlib.suppress(Exception):
            await read_all(call)
        # w2 serves another conversation and reports only the system prompt, shared with turn two.
        call = router.stub.StreamComplete(inference_pb2.CompletionRequest(
            system_message=SYSTEM, history=[inference_pb2.ChatMessage(role=1, content="other")]
        ))  # fmt: skip
        generate = await second.next_generate()
        second.send(
            worker_pb2.Chunk(
                request_id=generate.request_id,
                text="x",
                completion_tokens=1,
                finish_reason=worker_pb2.FINISH_STOP,
                held_prefix=conversation_hashes(SYSTEM, []),
            )
        )
        await read_all(call)
        # w1 is the least recently used but holds nothing now: turn two goes to w2's shorter match.
        call = router.stub.StreamComplete(turn_two())
        generate = await second.next_generate()
        assert first.pending("generate") == 0
        await second.serve(generate, ["ok"])
        await read_all(call)


@async_test
async def test_the_session_id_reaches_the_worker():
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        call = router.stub.StreamComplete(turn_two(), metadata=(("x-session-id", "chat-7"),))
        generate = await worker.next_generate()
        assert generate.session_id == "chat-7"
        await worker.serve(generate, ["ok"])
        await read_all(call)


@async_test
async def test_the_http_front_passes_the_session_header_on():
    http = HttpConfig(listen=f"127.0.0.1:{free_port()}")
    server = RouterServer(router_config(), RequestLimits(1 << 20, 512), http, "test-model")
    await server.start()
    try:
        async with workers(server.zmq_endpoint, "w1") as (worker,), aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.http_port}/v1/chat/completions"
            body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
            bad = await session.post(url, json=body, headers={"X-Session-Id": "x" * 200})
            assert bad.status == 400 and "x-session-id" in (await bad.json())["error"]["message"]
            answer = asyncio.ensure_future(session.post(url, json=body, headers={"X-Session-Id": "chat-9"}))
            generate = await worker.next_generate()
            assert generate.session_id == "chat-9"
            await worker.serve(generate, ["ok"])
            assert (await answer).status == 200
    finally:
        await server.stop()
