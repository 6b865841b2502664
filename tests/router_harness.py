"""Test helpers for the router: a real in-process router on ephemeral loopback ports, real gRPC
clients, and workers emulated in the test with real ZeroMQ DEALER sockets speaking the real
protocol (common/wire.py). The test decides what each emulated worker sends and when, which
makes scheduling and failure handling deterministic to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import zmq
import zmq.asyncio
from google.protobuf.message import Message

from common import wire
from common.config import RouterConfig
from protos import inference_pb2, inference_pb2_grpc, worker_pb2
from router.server import RouterServer
from router.validation import RequestLimits
from tests.harness import free_port

HEARTBEAT_S = 0.2  # x LIVENESS: 0.6 s of silence and a worker is lost; slack for a loaded CI machine
LIVENESS = 3
TEST_TIMEOUT_S = 15.0  # one test's event loop is cut off after this: a hang fails, never blocks CI
WAIT_S = 10.0  # how long `eventually` and message waits give a condition before failing


def async_test(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test function in a fresh event loop (the project does not use pytest-asyncio)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(_guarded(test(*args, **kwargs)))

    return run


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(
            f"{record.name}: {record.getMessage()} {record.exc_info and record.exc_info[1]!r}"
        )


async def _guarded(test: Awaitable[None]) -> None:
    """The test, cut off after TEST_TIMEOUT_S; then fail if anything raised where no one awaited it (a
    router callback, a timer, a task nobody read) or the router logged an error: both are bugs the
    router survives by design (it logs them and serves on), so only this check makes them visible."""
    unhandled: list[str] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda _loop, context: unhandled.append(f"{context.get('message')}: {context.get('exception')!r}")
    )
    router_errors = _ErrorRecords()
    router_log = logging.getLogger("router")
    router_log.addHandler(router_errors)
    try:
        await asyncio.wait_for(test, TEST_TIMEOUT_S)
    finally:
        router_log.removeHandler(router_errors)
    assert not unhandled, f"errors the event loop caught: {unhandled}"
    assert not router_errors.messages, f"the router logged errors: {router_errors.messages}"


async def eventually(condition: Callable[[], bool], what: str = "condition") -> None:
    """Wait until condition() holds; fail after WAIT_S. Polls: the router's state is in-process."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def router_config(**overrides: Any) -> RouterConfig:
    settings: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "zmq_bind": f"tcp://127.0.0.1:{free_port()}",
        "heartbeat_interval_s": HEARTBEAT_S,
        "liveness": LIVENESS,
        "queue_timeout_s": 30.0,
        "drain_timeout_s": 5.0,
    }
    settings.update(overrides)
    return RouterConfig(**settings)


@dataclass
class RouterUnderTest:
    server: RouterServer
    channel: grpc.aio.Channel
    stub: inference_pb2_grpc.InferenceServiceStub

    @property
    def endpoint(self) -> str:
        return self.server.zmq_endpoint

    def stream(self, prompt: str = "你好", **params: Any) -> grpc.aio.UnaryStreamCall:
        return self.stub.StreamComplete(request(prompt, **params))

    async def started_stream(
        self, worker: EmulatedWorker, prompt: str = "你好", **params: Any
    ) -> tuple[grpc.aio.UnaryStreamCall, worker_pb2.Generate]:
        """A StreamComplete call, and the Generate `worker` was given for it."""
        call = self.stream(prompt, **params)
        return call, await worker.next_generate()

    async def queued_stream(self, prompt: str = "你好", **params: Any) -> grpc.aio.UnaryStreamCall:
        """A StreamComplete call, returned once the router holds it in its queue (no worker free)."""
        queued_before = self.server.snapshot().queued
        call = self.stream(prompt, **params)
        await eventually(lambda: self.server.snapshot().queued == queued_before + 1, "the request queued")
        return call

    async def assert_the_next_request_reaches_a_worker(self) -> None:
        """A worker registering now is given the next request (not one that gave up or was cancelled)."""
        async with workers(self.endpoint, "w1") as (worker,):
            call = self.stream("next")
            assert (await worker.next_generate()).history[0].content == "next"
            call.cancel()


@contextlib.asynccontextmanager
async def running_router(
    max_new_tokens: int = 512, max_request_bytes: int = 1 << 20, **overrides: Any
) -> AsyncIterator[RouterUnderTest]:
    config = router_config(max_request_bytes=max_request_bytes, **overrides)
    server = RouterServer(config, RequestLimits(max_request_bytes, max_new_tokens))
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    try:
        yield RouterUnderTest(server, channel, inference_pb2_grpc.InferenceServiceStub(channel))
    finally:
        await channel.close()
        await server.stop()


def request(prompt: str = "你好", **params: Any) -> inference_pb2.CompletionRequest:
    return inference_pb2.CompletionRequest(
        system_message="You are a helpful assistant.",
        history=[inference_pb2.ChatMessage(role=1, content=prompt)],
        **params,
    )


class EmulatedWorker:
    """A worker process stand-in: a DEALER socket driven step by step by the test."""

    def __init__(
        self,
        endpoint: str,
        worker_id: str,
        *,
        routing_id: bytes | None = None,
        secure: Callable[[zmq.Socket], None] | None = None,
    ) -> None:
        """`secure`: applied to the socket before it connects (e.g. CurveClient.secure)."""
        self.worker_id = worker_id
        self._context = zmq.asyncio.Context.instance()
        self.socket = self._context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if secure is not None:
            secure(self.socket)
        if routing_id is not None:
            self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        self.socket.connect(endpoint)
        self.inbox: dict[str, asyncio.Queue[Message]] = {}
        self.heartbeats_received = 0
        self.current: str | None = None  # request id being served
        self.overlaps: list[str] = []  # Generates received while busy: must stay empty
        self._heartbeating = True
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._heartbeat())]

    async def register(
        self, *, protocol_version: int = wire.PROTOCOL_VERSION, restarts: int = 0
    ) -> worker_pb2.Welcome:
        self.hello(protocol_version=protocol_version, restarts=restarts)
        return await self.next("welcome")

    def hello(self, *, protocol_version: int = wire.PROTOCOL_VERSION, restarts: int = 0) -> None:
        self.send(
            worker_pb2.Hello(
                protocol_version=protocol_version,
                restarts=restarts,
                worker_id=self.worker_id,
                device_id=0,
                model_id="test-model",
                context_size=4096,
                pid=1234,
            )
        )

    def send(self, message: Message) -> None:
        self.socket.send(wire.pack(message))

    def send_raw(self, *frames: bytes) -> None:
        self.socket.send_multipart(frames)

    def chunk(
        self,
        request_id: str,
        text: str,
        tokens: int,
        *,
        finish: int = worker_pb2.FINISH_NONE,
        error_kind: int = worker_pb2.ERROR_NONE,
        error_message: str = "",
        created_unix_nanos: int = 0,
    ) -> None:
        self.send(
            worker_pb2.Chunk(
                request_id=request_id,
                text=text,
                completion_tokens=tokens,
                prompt_tokens=7,
                finish_reason=finish,
                error_kind=error_kind,
                error_message=error_message,
                created_unix_nanos=created_unix_nanos,
            )
        )
        if finish != worker_pb2.FINISH_NONE or error_kind != worker_pb2.ERROR_NONE:
            self.current = None

    async def next(self, kind: str) -> Any:
        """The next message of this kind from the router."""
        return await asyncio.wait_for(self._queue(kind).get(), WAIT_S)

    def pending(self, kind: str) -> int:
        return self._queue(kind).qsize()

    async def next_generate(self) -> worker_pb2.Generate:
        return await self.next("generate")

    async def serve(
        self, generate: worker_pb2.Generate, pieces: list[str], finish: int = worker_pb2.FINISH_STOP
    ) -> None:
        """Answer a Generate with one chunk per piece, the last one final."""
        for index, piece in enumerate(pieces, start=1):
            last = index == len(pieces)
            self.chunk(generate.request_id, piece, index, finish=finish if last else worker_pb2.FINISH_NONE)
            await asyncio.sleep(0)

    def stop_heartbeats(self) -> None:
        """Go silent, as a hung process would (messages the test sends explicitly still go out)."""
        self._heartbeating = False

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.socket.close()

    def _queue(self, kind: str) -> asyncio.Queue[Message]:
        return self.inbox.setdefault(kind, asyncio.Queue())

    async def _receive(self) -> None:
        while True:
            kind, message = wire.unpack(await self.socket.recv())
            if kind == "heartbeat":
                self.heartbeats_received += 1
                continue
            if kind == "generate":
                if self.current is not None:
                    self.overlaps.append(message.request_id)
                self.current = message.request_id
            self._queue(kind).put_nowait(message)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if self._heartbeating:
                self.send(worker_pb2.Heartbeat(busy_request_id=self.current or ""))


@contextlib.asynccontextmanager
async def background(*coroutines: Coroutine[Any, Any, None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run `coroutines` as tasks for the block, then cancel them; one that failed (an assertion in an
    emulated worker's loop) fails the test with its own error instead of being lost with the task."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [
            o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, asyncio.CancelledError)
        ]
        if failures:
            raise failures[0]


@contextlib.asynccontextmanager
async def unregistered_worker(endpoint: str, worker_id: str) -> AsyncIterator[EmulatedWorker]:
    """An emulated worker that has said nothing yet (the test drives its handshake), closed on exit."""
    worker = EmulatedWorker(endpoint, worker_id)
    try:
        yield worker
    finally:
        await worker.close()


@contextlib.asynccontextmanager
async def workers(endpoint: str, *worker_ids: str) -> AsyncIterator[list[EmulatedWorker]]:
    """Registered emulated workers, in the given order, closed on exit."""
    async with contextlib.AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(unregistered_worker(endpoint, worker_id))
            for worker_id in worker_ids
        ]
        for worker in started:
            await worker.register()
        yield started


async def read_all(call: grpc.aio.UnaryStreamCall) -> list[inference_pb2.Completion]:
    """The rest of a stream (read() rather than iteration: a test may have read some already)."""
    frames = []
    while (frame := await call.read()) is not grpc.aio.EOF:
        frames.append(frame)
    return frames


async def expect_status(awaitable: Awaitable[Any], code: grpc.StatusCode) -> str:
    """Await a call that must fail with `code`; return the status details."""
    try:
        await awaitable
    except grpc.aio.AioRpcError as error:
        assert error.code() == code, f"expected {code}, got {error.code()}: {error.details()}"
        return error.details() or ""
    raise AssertionError(f"expected {code}, the call succeeded")
