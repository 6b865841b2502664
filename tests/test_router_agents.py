"""The router's side of host agents and retiring workers, step by step: a real router in-process, real
gRPC clients, and a host agent and workers emulated on real ZeroMQ sockets (tests/router_harness.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator

import grpc

from common import wire
from common.config import AdminConfig, ModelConfig, PoolConfig, SecurityConfig, TlsConfig
from protos import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc, worker_pb2
from router.server import RouterServer
from router.validation import RequestLimits
from tests.harness import REPO
from tests.router_harness import (
    EmulatedWorker,
    RouterUnderTest,
    async_test,
    eventually,
    expect_status,
    free_port,
    read_all,
    request,
    router_config,
    unregistered_worker,
)
from tests.security_keys import GOOD_KEY, make_tls, write_api_keys

HOST = "host-a"


@contextlib.asynccontextmanager
async def router_with_admin(
    models: tuple[str, ...] = (),
) -> AsyncIterator[tuple[RouterUnderTest, admin_pb2_grpc.PoolAdminStub]]:
    pool = PoolConfig(
        admin=AdminConfig(listen=f"127.0.0.1:{free_port()}", operation_timeout_s=5.0),
        models=tuple(
            ModelConfig(name=name, engine="paced", devices=(device,)) for device, name in enumerate(models)
        ),
    )
    server = RouterServer(router_config(), RequestLimits(1 << 20, 512), pool=pool)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.admin_port}")
    try:
        yield (
            RouterUnderTest(server, channel, inference_pb2_grpc.InferenceServiceStub(channel)),
            admin_pb2_grpc.PoolAdminStub(admin_channel),
        )
    finally:
        await admin_channel.close()
        await channel.close()
        await server.stop()


async def register(worker: EmulatedWorker, pid: int, device: int = 0, model: str = "test-model") -> None:
    worker.send(
        worker_pb2.Hello(
            protocol_version=wire.PROTOCOL_VERSION,
            worker_id=worker.worker_id,
            device_id=device,
            model_id=model,
            context_size=4096,
            pid=pid,
            host=HOST,
        )
    )
    await worker.next("welcome")


async def register_agent(
    agent: EmulatedWorker, pids: list[int], device: str = "0", model: str = "test-model"
) -> None:
    agent.send(
        worker_pb2.AgentHello(protocol_version=wire.PROTOCOL_VERSION, agent_id="agent-a", host=HOST, pid=9)
    )
    await agent.next("welcome")
    agent.send(
        worker_pb2.AgentState(
            devices=[worker_pb2.DeviceTarget(device_id=device, model=model, workers=len(pids))],
            workers=[worker_pb2.AgentWorker(device_id=device, model=model, pid=pid) for pid in pids],
        )
    )


@async_test
async def test_the_router_retires_idle_workers_first_and_lets_a_busy_one_finish():
    async with (
        router_with_admin() as (router, admin),
        unregistered_worker(router.endpoint, "busy") as busy,
        unregistered_worker(router.endpoint, "idle") as idle,
        unregistered_worker(router.endpoint, "agent") as agent,
    ):
        await register(busy, pid=11)
        call, generate = await router.started_stream(busy, "running")
        await register(idle, pid=12)
        await register_agent(agent, [11, 12])

        agent.send(worker_pb2.RetireWorkers(device_id="0", count=1))
        assert list((await agent.next("retiring")).pids) == [12]  # the idle one
        assert (await idle.next("retire")).reason
        agent.send(worker_pb2.RetireWorkers(device_id="0", count=1))
        assert list((await agent.next("retiring")).pids) == [11]  # then the busy one, which finishes
        await busy.next("retire")

        queued = await router.queued_stream("waits")  # no worker takes new work any more
        await busy.serve(generate, ["still ", "answered"])
        frames = await read_all(call)
        assert "".join(frame.output_text for frame in frames) == "still answered"
        status = await admin.Status(admin_pb2.StatusRequest())
        assert {w.worker_id: w.state for w in status.workers} == {"busy": "draining", "idle": "draining"}

        busy.send(worker_pb2.Disconnect(reason="retired"))
        idle.send(worker_pb2.Disconnect(reason="retired"))
        await eventually(
            lambda: router.server.snapshot().workers_idle + router.server.snapshot().workers_busy == 0
        )
        assert router.server.snapshot().workers_lost == 0  # gone by design, not lost
        async with unregistered_worker(router.endpoint, "new") as newcomer:
            await register(newcomer, pid=13)
            assert (await newcomer.next_generate()).history[0].content == "waits"
            queued.cancel()


@async_test
async def test_a_cordoned_device_gets_no_new_work_until_uncordoned():
    async with (
        router_with_admin() as (router, admin),
        unregistered_worker(router.endpoint, "w0") as worker,
        unregistered_worker(router.endpoint, "agent") as agent,
    ):
        await register(worker, pid=11)
        await register_agent(agent, [11])
        await eventually(lambda: router.server.snapshot().workers_idle == 1)
        reply = await admin.Cordon(admin_pb2.DeviceRequest(device_id="0"))
        assert [w.state for w in reply.status.workers] == ["cordoned"]
        queued = await router.queued_stream("later")  # it stays queued: the only worker is cordoned
        await admin.Uncordon(admin_pb2.DeviceRequest(device_id="0"))
        assert (await worker.next_generate()).history[0].content == "later"
        queued.cancel()
        details = await expect_status(
            admin.Cordon(admin_pb2.DeviceRequest(device_id="5")), grpc.StatusCode.NOT_FOUND
        )
        assert details == "unknown device '5'; known devices: 0"


@async_test
async def test_each_model_has_its_queue_and_its_workers():
    async with (
        router_with_admin(models=("alpha", "beta")) as (router, admin),
        unregistered_worker(router.endpoint, "a1") as alpha,
        unregistered_worker(router.endpoint, "b1") as beta,
    ):
        await register(alpha, pid=11, device=0, model="alpha")
        call, generate = await router.started_stream(alpha, "one")  # the default model: alpha
        second = router.stub.StreamComplete(request("two"))  # alpha is busy: it waits ...
        await eventually(lambda: router.server.snapshot().queued == 1)
        await register(beta, pid=12, device=1, model="beta")  # ... and a beta worker does not take it
        by_field = router.stub.StreamComplete(inference_pb2.CompletionRequest(
            history=[inference_pb2.ChatMessage(role=1, content="three")], model="beta"))  # fmt: skip
        assert (await beta.next_generate()).history[0].content == "three"
        by_metadata = router.stub.StreamComplete(request("four"), metadata=(("x-model", "beta"),))
        await eventually(lambda: router.server.snapshot().queued == 2)
        status = await admin.Status(admin_pb2.StatusRequest())
        assert {(q.model, q.queued) for q in status.queues} == {("alpha", 1), ("beta", 1)}
        assert status.default_model == "alpha"
        await alpha.serve(generate, ["done"])
        await read_all(call)
        assert (await alpha.next_generate()).history[0].content == "two"
        status = await admin.Status(admin_pb2.StatusRequest())
        (a1,) = [worker for worker in status.workers if worker.worker_id == "a1"]
        assert (a1.requests_served, a1.tokens_served, a1.state, a1.model, a1.device_id) == (
            1,
            1,
            "busy",
            "alpha",
            "0",
        )
        assert a1.request_id and a1.host == HOST and a1.pid == 11 and a1.uptime_s > 0
        for pending in (second, by_field, by_metadata):
            pending.cancel()
        details = await expect_status(
            router.stub.Complete(request("x"), metadata=(("x-model", "gamma"),)), grpc.StatusCode.NOT_FOUND
        )
        assert details == "model 'gamma' is not served here; served models: alpha, beta"
        both = inference_pb2.CompletionRequest(
            history=[inference_pb2.ChatMessage(role=1, content="x")], model="alpha"
        )
        details = await expect_status(
            router.stub.Complete(both, metadata=(("x-model", "beta"),)), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert details == "the request names model 'alpha' but its x-model metadata says 'beta'"
        served = {
            "front": "grpc",
            "grpc_method": "StreamComplete",
            "grpc_code": "OK",
            "finish_reason": "stop",
            "model": "alpha",
        }
        metrics = router.server.metrics.registry
        await eventually(lambda: metrics.get_sample_value("bm_pool_requests_total", served) == 1)


@async_test
async def test_an_agent_of_another_protocol_version_is_refused_clearly():
    async with router_with_admin() as (router, admin), unregistered_worker(router.endpoint, "agent") as agent:
        agent.send(worker_pb2.AgentHello(protocol_version=1, agent_id="old", host=HOST, pid=9))
        refusal = await agent.next("disconnect")
        assert refusal.reason == (
            f"protocol version 1 is not supported: this router speaks version {wire.PROTOCOL_VERSION}"
        )
        assert not (await admin.Status(admin_pb2.StatusRequest())).agents


@async_test
async def test_a_second_router_on_the_same_admin_address_fails_to_start_saying_why():
    async with router_with_admin() as (router, _):
        address = f"127.0.0.1:{router.server.admin_port}"
        second = RouterServer(
            router_config(), RequestLimits(1 << 20, 512), pool=PoolConfig(admin=AdminConfig(listen=address))
        )
        try:
            await second.start()
        except OSError as error:
            assert str(error).startswith(f"cannot listen for the admin API on {address}")
        else:
            await second.stop()
            raise AssertionError("a second router bound the same admin address")


@async_test
async def test_poolctl_speaks_tls_and_sends_the_admin_key_from_the_environment(tmp_path):
    tls = make_tls(tmp_path / "tls")
    security = SecurityConfig(
        tls=TlsConfig(cert_file=str(tls.server_cert), key_file=str(tls.server_key)),
        admin_api_keys_file=str(write_api_keys(tmp_path / "admin_keys", GOOD_KEY)),
    )
    pool = PoolConfig(admin=AdminConfig(listen=f"127.0.0.1:{free_port()}"))
    server = RouterServer(router_config(), RequestLimits(1 << 20, 512), security=security, pool=pool)
    await server.start()
    try:
        address = f"127.0.0.1:{server.admin_port}"
        no_key = await poolctl(address, "--tls-ca", str(tls.ca_cert), "--json", "status")
        assert no_key[0] == 6 and "UNAUTHENTICATED" in no_key[2]
        with_key = await poolctl(address, "--tls-ca", str(tls.ca_cert), "--json", "status", key=GOOD_KEY)
        assert with_key[:2] == (0, "[]\n")
        plain = await poolctl(address, "--timeout", "3", "status", key=GOOD_KEY)
        assert plain[0] == 1 and "UNAVAILABLE" in plain[2]
    finally:
        await server.stop()


async def poolctl(address: str, *args: str, key: str | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of scripts/poolctl.py, run while this event loop serves the router."""
    env = {k: v for k, v in os.environ.items() if k not in ("BM_POOL_ADMIN_KEY", "BM_POOL_API_KEY")}
    if key is not None:
        env["BM_POOL_API_KEY"] = key
    process = await asyncio.create_subprocess_exec(
        sys.executable, "scripts/poolctl.py", "--admin", address, *args,
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()
