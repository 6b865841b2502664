"""The router as a server: health transitions, reflection, graceful drain, and `python -m router`
as a real process stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.config import EVENT_LOOPS
from protos import inference_pb2_grpc
from router.server import RouterServer
from router.validation import RequestLimits
from tests.router_harness import (
    EmulatedWorker,
    async_test,
    eventually,
    expect_status,
    free_port,
    read_all,
    request,
    router_config,
    running_router,
    workers,
)

REPO = Path(__file__).resolve().parents[1]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health(channel: grpc.aio.Channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return response.status


async def health_becomes(channel: grpc.aio.Channel, status: int) -> None:
    for service in ("", "InferenceService"):
        deadline = asyncio.get_running_loop().time() + 10
        while await health(channel, service) != status:
            assert asyncio.get_running_loop().time() < deadline, (
                f"health of {service!r} never became {status}"
            )
            await asyncio.sleep(0.02)


@async_test
async def test_health_follows_the_workers():
    async with running_router() as router:
        assert await health(router.channel) == NOT_SERVING
        assert await health(router.channel, "InferenceService") == NOT_SERVING
        async with workers(router.endpoint, "w1", "w2") as (w1, w2):
            await health_becomes(router.channel, SERVING)
            w1.stop_heartbeats()
            await w1.next("disconnect")
            assert await health(router.channel) == SERVING  # w2 is still there
            w2.stop_heartbeats()
            await health_becomes(router.channel, NOT_SERVING)


@async_test
async def test_reflection_lists_the_services():
    async with running_router() as router:
        stub = reflection_pb2_grpc.ServerReflectionStub(router.channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        response = await call.read()
        await call.done_writing()
        names = {service.name for service in response.list_services_response.service}
        assert {"InferenceService", "grpc.health.v1.Health"} <= names
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="InferenceService"))
        response = await call.read()
        await call.done_writing()
        assert response.file_descriptor_response.file_descriptor_proto  # grpcurl can describe it


@async_test
async def test_drain_refuses_new_calls_and_lets_open_streams_finish(caplog):
    caplog.set_level(logging.INFO, logger="router.server")
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        await health_becomes(router.channel, SERVING)
        call, generate = await router.started_stream(worker, "finish me")
        worker.chunk(generate.request_id, "half", 1)
        assert (await call.read()).output_text == "half"
        drain = asyncio.create_task(router.server.drain())
        await health_becomes(router.channel, NOT_SERVING)
        details = await expect_status(router.stub.Complete(request("late")), grpc.StatusCode.UNAVAILABLE)
        assert "draining" in details
        assert not drain.done()
        worker.chunk(generate.request_id, " done", 2, finish=1)
        rest = await read_all(call)
        assert "".join(frame.output_text for frame in rest) == " done" and rest[-1].finished
        await drain
    assert "draining: 1 open calls" in caplog.text
    assert "drain timeout" not in caplog.text  # the last call's end ended the drain, not the timeout


@async_test
async def test_a_drain_that_times_out_ends_open_calls_with_unavailable_and_cancels_the_work():
    async with running_router(drain_timeout_s=0.3) as router, workers(router.endpoint, "w1") as (worker,):
        call, generate = await router.started_stream(worker, "endless")
        drain = asyncio.create_task(router.server.drain())
        details = await expect_status(read_all(call), grpc.StatusCode.UNAVAILABLE)
        assert "drain timeout" in details
        assert (await worker.next("cancel")).request_id == generate.request_id
        await drain


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_the_router_process_drains_on_sigterm_and_exits_0(event_loop: str, tmp_path: Path):
    config = tmp_path / "pool.yaml"
    config.write_text(f"router: {{event_loop: {event_loop}}}\n", encoding="utf-8")
    asyncio.run(asyncio.wait_for(_router_process_drains_on_sigterm(config, event_loop), 60))


async def _router_process_drains_on_sigterm(config: Path, event_loop: str) -> None:
    grpc_port, zmq_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "--config", str(config), "--listen", f"127.0.0.1:{grpc_port}",
        "--zmq-bind", f"tcp://127.0.0.1:{zmq_port}", "--admin-listen", f"127.0.0.1:{free_port()}",
        cwd=REPO, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        await channel.channel_ready()
        worker = EmulatedWorker(f"tcp://127.0.0.1:{zmq_port}", "w1")
        await worker.register()
        await health_becomes(channel, SERVING)
        call = inference_pb2_grpc.InferenceServiceStub(channel).StreamComplete(request("hi"))
        generate = await worker.next_generate()
        process.send_signal(signal.SIGTERM)
        await health_becomes(channel, NOT_SERVING)
        await worker.serve(generate, ["still ", "answered"])
        frames = await read_all(call)
        assert "".join(frame.output_text for frame in frames) == "still answered"
        assert await process.wait() == 0
        log = (await process.stderr.read()).decode()
        assert "draining" in log and "router stopped" in log
        assert f"event loop: {event_loop}" in log
        await worker.close()
        await channel.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_the_router_process_refuses_a_bad_config_with_a_message():
    completed = subprocess.run(
        [sys.executable, "-m", "router", "--config", "/nonexistent/pool.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 1
    assert "/nonexistent/pool.yaml" in completed.stderr


@async_test
async def test_the_snapshot_counts_queue_calls_and_workers():
    async with running_router() as router:
        call = await router.queued_stream("waiting")
        snapshot = router.server.snapshot()
        assert (snapshot.queued, snapshot.running, snapshot.open_calls) == (1, 0, 1)
        async with workers(router.endpoint, "w1", "w2") as (w1, _):
            generate = await w1.next_generate()
            snapshot = router.server.snapshot()
            assert (snapshot.queued, snapshot.running) == (0, 1)
            assert (snapshot.workers_busy, snapshot.workers_idle) == (1, 1)
            await w1.serve(generate, ["ok"])
            await read_all(call)
            await eventually(lambda: router.server.snapshot().open_calls == 0, "the call closed")
            assert router.server.snapshot().workers_idle == 2


@async_test
async def test_an_address_in_use_fails_the_start_with_a_message_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for config, words in (
            (router_config(listen=f"127.0.0.1:{port}"), f"cannot listen for gRPC on 127.0.0.1:{port}"),
            (
                router_config(zmq_bind=f"tcp://127.0.0.1:{port}"),
                f"cannot bind the worker socket to tcp://127.0.0.1:{port}",
            ),
        ):
            server = RouterServer(config, RequestLimits(1 << 20, 512))
            with pytest.raises(OSError) as refused:
                await server.start()
            assert words in str(refused.value)
