"""The HTTP front's refusals and failures, with the official `openai` SDK (async) as the client.

A real in-process router (gRPC and HTTP on loopback) with workers emulated over real ZeroMQ
(tests/router_harness.py), so each outcome is produced on purpose: queue full, queue timeout, no
worker, a worker lost mid-stream, an engine error, a drain, a client that disconnects, and the
API keys (common/security.py's middleware). Each maps to the status and SDK exception the issue names.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from common.config import HttpConfig, SecurityConfig
from common.security import KEY_NEEDED_MESSAGE
from protos import worker_pb2
from router.server import RouterServer
from router.validation import RequestLimits
from tests.router_harness import (
    async_test,
    eventually,
    free_port,
    router_config,
    workers,
)

MODEL = "test-model"  # what the emulated workers say they serve
RIGHT_KEY = "sk-test-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "hello"}]


@contextlib.asynccontextmanager
async def http_router(
    security: SecurityConfig | None = None, **overrides: Any
) -> AsyncIterator[tuple[RouterServer, openai.AsyncOpenAI]]:
    config = router_config(**overrides)
    http = HttpConfig(listen=f"127.0.0.1:{free_port()}", max_n=4)
    server = RouterServer(config, RequestLimits(1 << 20, 512), http, MODEL, security=security)
    await server.start()
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0, timeout=10
    )
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop()


def chat(client: openai.AsyncOpenAI, **params: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, **params)


@async_test
async def test_no_worker_is_503_service_unavailable() -> None:
    async with http_router() as (server, client):
        with pytest.raises(openai.APIStatusError) as raised:
            await chat(client, extra_headers={"x-request-id": "refused-1"})
        assert raised.value.status_code == 503 and raised.value.code == "no_worker"
        assert "no worker is registered" in raised.value.message
        assert raised.value.response.headers["x-request-id"] == "refused-1"
        async with aiohttp.ClientSession() as session:
            health = await session.get(f"http://127.0.0.1:{server.http_port}/health")
            assert health.status == 503 and (await health.json()) == {"status": "no_worker", "workers": 0}


@async_test
async def test_a_full_queue_is_429_rate_limit_with_retry_after() -> None:
    async with http_router(queue_size=1) as (server, client), workers(server.zmq_endpoint, "w1") as (worker,):
        busy = asyncio.create_task(chat(client))
        await worker.next_generate()
        queued = asyncio.create_task(chat(client))
        await eventually(lambda: server.snapshot().queued == 1, "a request queued")
        with pytest.raises(openai.RateLimitError) as raised:
            await chat(client)
        assert raised.value.response.headers["Retry-After"] == "1"
        assert "the queue is full (1 requests waiting for a worker)" in raised.value.message
        for task in (busy, queued):
            task.cancel()
        await asyncio.gather(busy, queued, return_exceptions=True)


@async_test
async def test_a_queue_timeout_is_504() -> None:
    async with (
        http_router(queue_timeout_s=0.3) as (server, client),
        workers(server.zmq_endpoint, "w1") as (worker,),
    ):
        busy = asyncio.create_task(chat(client))
        await worker.next_generate()
        with pytest.raises(openai.APIStatusError) as raised:
            await chat(client)
        assert raised.value.status_code == 504
        assert "no worker became free before the queue timeout" in raised.value.message
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)


@async_test
async def test_an_engine_error_before_any_text_is_500_and_after_text_an_error_event() -> None:
    async with http_router() as (server, client), workers(server.zmq_endpoint, "w1") as (worker,):
        whole = asyncio.create_task(chat(client))
        generate = await worker.next_generate()
        worker.chunk(
            generate.request_id, "", 0, error_kind=worker_pb2.ERROR_ENGINE, error_message="chip on fire"
        )
        with pytest.raises(openai.InternalServerError) as raised:
            await whole
        assert raised.value.status_code == 500 and "chip on fire" in raised.value.message

        stream = asyncio.create_task(collect(chat(client, stream=True), []))
        generate = await worker.next_generate()
        worker.chunk(generate.request_id, "Hel", 1)
        worker.chunk(
            generate.request_id, "lo", 2, error_kind=worker_pb2.ERROR_ENGINE, error_message="chip melted"
        )
        with pytest.raises(openai.APIError) as failed:
            await stream
        assert "chip melted" in failed.value.message


@async_test
async def test_the_worker_refusing_the_prompt_is_400() -> None:
    async with http_router() as (server, client), workers(server.zmq_endpoint, "w1") as (worker,):
        call = asyncio.create_task(chat(client, stream=True))
        generate = await worker.next_generate()
        worker.chunk(
            generate.request_id,
            "",
            0,
            error_kind=worker_pb2.ERROR_INVALID_REQUEST,
            error_message="no room left",
        )
        with pytest.raises(openai.BadRequestError) as raised:
            await call
        assert "no room left" in raised.value.message


@async_test
async def test_a_worker_lost_mid_stream_ends_the_stream_with_an_error_event() -> None:
    async with http_router() as (server, client), workers(server.zmq_endpoint, "w1") as (worker,):
        texts: list[str] = []
        stream = asyncio.create_task(collect(chat(client, stream=True), texts))
        generate = await worker.next_generate()
        worker.chunk(generate.request_id, "Hi", 1)
        await eventually(lambda: texts == ["", "Hi"], "the first text to arrive")
        worker.stop_heartbeats()
        with pytest.raises(openai.APIError) as failed:
            await stream
        assert "worker w1 was lost" in failed.value.message


@async_test
async def test_a_client_that_disconnects_cancels_its_request_on_the_worker() -> None:
    async with http_router() as (server, _client), workers(server.zmq_endpoint, "w1") as (worker,):
        url = f"http://127.0.0.1:{server.http_port}/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            posted = asyncio.create_task(session.post(url, json={"messages": MESSAGES, "stream": True}))
            generate = await worker.next_generate()
            worker.chunk(generate.request_id, "Hi", 1)  # the headers go out with the first event
            response = await posted
            assert (await response.content.readuntil(b"\n\n")).startswith(b"data: ")  # the role chunk
            response.close()  # the connection goes away mid-stream
        cancel = await worker.next("cancel")
        assert cancel.request_id == generate.request_id
        worker.chunk(generate.request_id, "", 1, finish=worker_pb2.FINISH_CANCELLED)
        await eventually(lambda: server.snapshot().workers_idle == 1, "the worker freed")
        await eventually(lambda: server.snapshot().open_calls == 0, "the call closed")


@async_test
async def test_a_client_that_disconnects_while_queued_never_reaches_a_worker() -> None:
    async with http_router() as (server, _client), workers(server.zmq_endpoint, "w1") as (worker,):
        url = f"http://127.0.0.1:{server.http_port}/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            busy = asyncio.create_task(session.post(url, json={"messages": MESSAGES}))
            await worker.next_generate()
            queued = asyncio.create_task(session.post(url, json={"messages": MESSAGES}))
            await eventually(lambda: server.snapshot().queued == 1, "a request queued")
            queued.cancel()
            await asyncio.gather(queued, return_exceptions=True)
            await eventually(lambda: server.snapshot().queued == 0, "the queued request gone")
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)
        assert worker.pending("generate") == 0


@async_test
async def test_draining_refuses_new_calls_with_503_and_lets_streams_finish() -> None:
    async with http_router() as (server, client), workers(server.zmq_endpoint, "w1") as (worker,):
        texts: list[str] = []
        stream = asyncio.create_task(collect(chat(client, stream=True), texts))
        generate = await worker.next_generate()
        worker.chunk(generate.request_id, "Hi", 1)
        await eventually(lambda: texts == ["", "Hi"], "the stream under way")
        drain = asyncio.create_task(server.drain())
        await eventually(lambda: server._draining, "the drain begun")
        with pytest.raises(openai.APIStatusError) as refused:
            await chat(client)
        assert refused.value.status_code == 503 and "draining" in refused.value.message
        async with aiohttp.ClientSession() as session:
            health = await session.get(f"http://127.0.0.1:{server.http_port}/health")
            assert health.status == 503 and (await health.json())["status"] == "draining"
        worker.chunk(generate.request_id, " there", 2, finish=worker_pb2.FINISH_STOP)
        assert "".join(await stream) == "Hi there"
        await drain


@async_test
async def test_a_missing_or_wrong_api_key_is_401_authentication_error() -> None:
    with tempfile.TemporaryDirectory() as folder:
        keys = Path(folder) / "keys"
        keys.write_text(f"{RIGHT_KEY}\n")
        async with http_router(SecurityConfig(api_keys_file=str(keys))) as (server, client):
            with pytest.raises(openai.AuthenticationError) as raised:
                await chat(client)
            assert raised.value.message.endswith(KEY_NEEDED_MESSAGE)
            assert raised.value.code == "invalid_api_key"
            allowed = openai.AsyncOpenAI(base_url=client.base_url, api_key=RIGHT_KEY, max_retries=0)
            assert (await allowed.models.list()).data[0].id == MODEL
            await allowed.close()
            async with (
                aiohttp.ClientSession() as session
            ):  # the page and health stay open for people and probes
                for path in ("/", "/health"):
                    response = await session.get(f"http://127.0.0.1:{server.http_port}{path}")
                    assert response.status != 401, path


@async_test
async def test_unknown_model_is_404_model_not_found() -> None:
    async with http_router() as (_server, client):
        with pytest.raises(openai.NotFoundError) as raised:
            await client.chat.completions.create(model="gpt-5", messages=MESSAGES)
        assert raised.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-5")
        assert (await client.models.retrieve(MODEL)).id == MODEL


@async_test
async def test_n_choices_run_on_as_many_workers_and_are_indexed_in_the_stream() -> None:
    async with http_router() as (server, client), workers(server.zmq_endpoint, "w1", "w2") as pair:
        longest_id = "r" * 128  # the longest x-request-id a client may send; choice 1 adds "-1"
        headers = {"x-request-id": longest_id}
        stream = asyncio.create_task(chunks_of(chat(client, stream=True, n=2, seed=7, extra_headers=headers)))
        generates = [await worker.next_generate() for worker in pair]
        assert {g.params.seed for g in generates} == {7, 8}  # each choice its own generation
        assert {g.request_id for g in generates} == {longest_id, f"{longest_id}-1"}
        for worker, generate, text in zip(pair, generates, ("one", "two"), strict=True):
            worker.chunk(generate.request_id, text, 1, finish=worker_pb2.FINISH_STOP)
        texts = {0: "", 1: ""}
        for chunk in await stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
        assert sorted(texts.values()) == ["one", "two"]


async def collect(create: Any, texts: list[str]) -> list[str]:
    """Read a chat stream, appending each delta's content to `texts` as it arrives."""
    async for chunk in await create:
        for choice in chunk.choices:
            texts.append(choice.delta.content or "")
    return texts


async def chunks_of(create: Any) -> list[Any]:
    return [chunk async for chunk in await create]


@async_test
async def test_one_failed_choice_fails_the_request_and_cancels_the_others() -> None:
    async with http_router() as (server, client), workers(server.zmq_endpoint, "w1", "w2") as pair:
        whole = asyncio.create_task(chat(client, n=2))
        generates = [await worker.next_generate() for worker in pair]
        pair[0].chunk(
            generates[0].request_id, "", 0, error_kind=worker_pb2.ERROR_ENGINE, error_message="boom"
        )
        with pytest.raises(openai.InternalServerError, match="boom"):
            await whole
        assert (await pair[1].next("cancel")).request_id == generates[1].request_id
        pair[1].chunk(generates[1].request_id, "", 0, finish=worker_pb2.FINISH_CANCELLED)
        await eventually(lambda: server.snapshot().workers_idle == 2, "both workers free")
        await eventually(lambda: server.snapshot().open_calls == 0, "no call left open")


@async_test
async def test_a_taken_http_port_fails_the_start_clearly_and_null_means_no_front() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        server = RouterServer(router_config(), RequestLimits(1 << 20, 512), HttpConfig(listen=taken), MODEL)
        with pytest.raises(OSError, match=f"cannot listen for HTTP on {taken}"):
            await server.start()
    off = RouterServer(router_config(), RequestLimits(1 << 20, 512), HttpConfig(listen=None), MODEL)
    await off.start()
    assert off.http_port == 0 and off.grpc_port != 0
    await off.stop()
