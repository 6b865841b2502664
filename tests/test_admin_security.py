"""The admin API behind the security of the fronts (router/server.py gives the admin server
FrontSecurity's admin key check and TLS): keys of its own or the clients' keys, TLS and mutual TLS,
and scripts/poolctl.py talking to it with a key and a certificate. A real router in-process with
emulated workers on real sockets, poolctl as a real subprocess; and one whole pool of processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import AdminConfig, PoolConfig, SecurityConfig, TlsConfig
from common.security import KEY_NEEDED_MESSAGE
from protos import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from router.server import RouterServer
from router.validation import RequestLimits
from tests.harness import REPO, ProcessSet, start_pool, wait_until, write_config
from tests.router_harness import async_test, expect_status, free_port, request, router_config, workers
from tests.security_keys import GOOD_KEY, OTHER_KEY, WRONG_KEY, TlsFilesForTest, make_tls, write_api_keys

CLIENT_KEY = GOOD_KEY
ADMIN_KEY = OTHER_KEY
POOLCTL = REPO / "scripts" / "poolctl.py"


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def keyed(tmp_path: Path, *, admin_keys: bool = True, tls: TlsConfig | None = None) -> SecurityConfig:
    """Client key CLIENT_KEY; the admin API's own ADMIN_KEY when `admin_keys` (else the clients')."""
    admin_file = str(write_api_keys(tmp_path / "admin_keys", ADMIN_KEY)) if admin_keys else None
    return SecurityConfig(
        tls=tls or TlsConfig(),
        api_keys_file=str(write_api_keys(tmp_path / "keys", CLIENT_KEY)),
        admin_api_keys_file=admin_file,
    )


def tls_of(files: TlsFilesForTest, *, mutual: bool = False) -> TlsConfig:
    return TlsConfig(
        cert_file=str(files.server_cert),
        key_file=str(files.server_key),
        client_ca_file=str(files.ca_cert) if mutual else None,
    )


@contextlib.asynccontextmanager
async def secured_admin(security: SecurityConfig) -> AsyncIterator[RouterServer]:
    """A router with its admin API (device 0 in the pool), secured as `security` says."""
    admin = AdminConfig(listen=f"127.0.0.1:{free_port()}", operation_timeout_s=10.0)
    pool = PoolConfig(admin=admin, security=security)
    server = RouterServer(router_config(), RequestLimits(1 << 20, 512), security=security, pool=pool)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def refused_count(server: RouterServer) -> float:
    return server.metrics.registry.get_sample_value("bm_pool_refused_total", {"reason": "api_key"}) or 0.0


async def expect_unauthenticated(call: object) -> None:
    assert await expect_status(call, grpc.StatusCode.UNAUTHENTICATED) == KEY_NEEDED_MESSAGE  # type: ignore[arg-type]


@async_test
async def test_admin_keys_of_its_own_refuse_no_key_a_wrong_key_and_a_clients_key(tmp_path):
    async with (
        secured_admin(keyed(tmp_path)) as server,
        workers(server.zmq_endpoint, "w1"),
        grpc.aio.insecure_channel(f"127.0.0.1:{server.admin_port}") as channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as public,
    ):
        admin = admin_pb2_grpc.PoolAdminStub(channel)
        cordon = admin_pb2.DeviceRequest(device_id="0")
        for metadata in ((), bearer(WRONG_KEY), bearer(CLIENT_KEY), (("authorization", ADMIN_KEY),)):
            await expect_unauthenticated(admin.Status(admin_pb2.StatusRequest(), metadata=metadata))
            await expect_unauthenticated(admin.Cordon(cordon, metadata=metadata))
            drain = admin.Drain(cordon, metadata=metadata)  # a streaming call is refused the same way
            await expect_unauthenticated(drain.read())
        assert refused_count(server) == 12
        status = await admin.Status(admin_pb2.StatusRequest(), metadata=bearer(ADMIN_KEY))
        assert [device.cordoned for device in status.devices] == [False]  # no refused call acted

        reply = await admin.Cordon(cordon, metadata=bearer(ADMIN_KEY))
        assert reply.message.startswith("device 0 cordoned") and reply.status.devices[0].cordoned
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # open: probes need no key

        # The admin key is not a client key: the public front refuses it.
        inference = inference_pb2_grpc.InferenceServiceStub(public)
        await expect_unauthenticated(inference.Complete(request("x"), metadata=bearer(ADMIN_KEY)))


@async_test
async def test_without_admin_keys_the_clients_keys_guard_the_admin_api(tmp_path):
    async with (
        secured_admin(keyed(tmp_path, admin_keys=False)) as server,
        workers(server.zmq_endpoint, "w1"),
        grpc.aio.insecure_channel(f"127.0.0.1:{server.admin_port}") as channel,
    ):
        admin = admin_pb2_grpc.PoolAdminStub(channel)
        for metadata in ((), bearer(WRONG_KEY), bearer(ADMIN_KEY)):
            await expect_unauthenticated(admin.Status(admin_pb2.StatusRequest(), metadata=metadata))
        status = await admin.Status(admin_pb2.StatusRequest(), metadata=bearer(CLIENT_KEY))
        assert [device.device_id for device in status.devices] == ["0"]


@async_test
async def test_the_admin_api_speaks_tls_and_mutual_tls_refuses_a_client_without_a_certificate(tmp_path):
    files = make_tls(tmp_path / "tls")
    security = keyed(tmp_path, tls=tls_of(files, mutual=True))
    async with secured_admin(security) as server, workers(server.zmq_endpoint, "w1"):
        address = f"localhost:{server.admin_port}"
        status = admin_pb2.StatusRequest()
        async with grpc.aio.insecure_channel(address) as plain:  # plain text to a TLS port
            call = admin_pb2_grpc.PoolAdminStub(plain).Status(status, metadata=bearer(ADMIN_KEY), timeout=5)
            await expect_status(call, grpc.StatusCode.UNAVAILABLE)
        without_certificate = grpc.ssl_channel_credentials(files.ca_bytes())
        async with grpc.aio.secure_channel(address, without_certificate) as channel:
            call = admin_pb2_grpc.PoolAdminStub(channel).Status(status, metadata=bearer(ADMIN_KEY), timeout=5)
            await expect_status(call, grpc.StatusCode.UNAVAILABLE)
        with_certificate = grpc.ssl_channel_credentials(files.ca_bytes(), *files.client_pair())
        async with grpc.aio.secure_channel(address, with_certificate) as channel:
            admin = admin_pb2_grpc.PoolAdminStub(channel)
            await expect_unauthenticated(admin.Status(status))  # TLS is not a key
            reply = await admin.Status(status, metadata=bearer(ADMIN_KEY))
            assert [worker.worker_id for worker in reply.workers] == ["w1"]


async def poolctl(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """scripts/poolctl.py as an operator runs it; (exit code, stdout, stderr)."""
    environment = {key: value for key, value in os.environ.items() if key != "BM_POOL_API_KEY"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(POOLCTL), "--timeout", "20", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**environment, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@async_test
async def test_poolctl_calls_a_tls_admin_api_with_a_client_certificate_and_a_key(tmp_path):
    files = make_tls(tmp_path / "tls")
    security = keyed(tmp_path, tls=tls_of(files, mutual=True))
    key_file = tmp_path / "operator_key"
    key_file.write_text(f"# the operator's key\n\n{ADMIN_KEY}\n")
    wrong_file = tmp_path / "wrong_key"
    wrong_file.write_text(f"{CLIENT_KEY}\n")
    async with secured_admin(security) as server, workers(server.zmq_endpoint, "w1"):
        admin = ["--admin", f"localhost:{server.admin_port}"]
        tls = [
            "--tls-ca",
            str(files.ca_cert),
            "--tls-cert",
            str(files.client_cert),
            "--tls-key",
            str(files.client_key),
        ]

        code, out, err = await poolctl(*admin, *tls, "--api-key-file", str(key_file), "--json", "status")
        assert code == 0, err
        assert [(w["worker_id"], w["device_id"], w["state"]) for w in json.loads(out)] == [
            ("w1", "0", "idle")
        ]
        code, out, err = await poolctl(*admin, *tls, "cordon", "0", env={"BM_POOL_API_KEY": ADMIN_KEY})
        assert (code, out) == (
            0,
            "device 0 cordoned: no new work for its workers; 0 running requests finish\n",
        ), err

        for key in ((), ("--api-key-file", str(wrong_file))):
            code, out, err = await poolctl(*admin, *tls, *key, "uncordon", "0")
            assert (code, out) == (6, "")
            assert err == f"poolctl: uncordon: UNAUTHENTICATED: {KEY_NEEDED_MESSAGE}\n"
        code, _, err = await poolctl(*admin, *tls, "status", env={"BM_POOL_API_KEY": WRONG_KEY})
        assert code == 6 and "UNAUTHENTICATED" in err
        code, out, err = await poolctl(*admin, *tls, "--api-key-file", str(key_file), "--json", "status")
        assert [w["state"] for w in json.loads(out)] == ["cordoned"], err  # the refused uncordons did nothing

        key = ["--api-key-file", str(key_file)]
        code, _, err = await poolctl(*admin, *key, "status")  # plain text to the TLS port
        assert code == 1 and "UNAVAILABLE" in err
        code, _, err = await poolctl(
            *admin, "--tls-ca", str(files.ca_cert), *key, "status"
        )  # no client certificate
        assert code == 1 and "UNAVAILABLE" in err
        code, _, err = await poolctl(*admin, *tls, "--api-key-file", str(tmp_path / "missing"), "status")
        assert code == 2 and "--api-key-file" in err and "missing" in err
        code, _, err = await poolctl(*admin, "--tls-ca", str(tmp_path / "no-ca.pem"), *key, "status")
        assert code == 2 and "--tls-ca" in err and "no-ca.pem: cannot read it" in err
        code, _, err = await poolctl(
            *admin, "--tls-ca", str(files.ca_cert), "--tls-cert", str(files.client_cert), "status"
        )
        assert code == 2 and "--tls-cert and --tls-key go together" in err


@async_test
async def test_poolctl_checks_the_certificate_for_the_name_tls_server_name_gives(tmp_path):
    """As through `kubectl port-forward`: the address is 127.0.0.1, the certificate names the service."""
    files = make_tls(tmp_path / "tls", "pool.example")
    security = keyed(tmp_path, tls=tls_of(files))
    async with secured_admin(security) as server:
        admin = ["--admin", f"127.0.0.1:{server.admin_port}", "--tls-ca", str(files.ca_cert)]
        env = {"BM_POOL_API_KEY": ADMIN_KEY}
        code, _, err = await poolctl(*admin, "status", env=env)
        assert code == 1 and "UNAVAILABLE" in err  # 127.0.0.1 is not a name in the certificate
        code, _, err = await poolctl(*admin, "--tls-server-name", "other.example", "status", env=env)
        assert code == 1 and "UNAVAILABLE" in err
        code, out, err = await poolctl(
            *admin, "--tls-server-name", "pool.example", "--json", "status", env=env
        )
        assert (code, json.loads(out or "null")) == (0, []), err


def test_a_pool_with_admin_keys_is_scaled_by_poolctl_with_the_admin_key(procs: ProcessSet, tmp_path):
    """The whole path through the processes: the router reads admin_api_keys_file from the YAML,
    the host agent still obeys (its link is the worker socket, not the admin API)."""
    keys = write_api_keys(tmp_path / "keys", CLIENT_KEY)
    admin_keys = write_api_keys(tmp_path / "admin_keys", ADMIN_KEY)
    config = write_config(
        tmp_path,
        {
            "workers": {"devices": [0], "per_device": 1},
            "security": {"api_keys_file": str(keys), "admin_api_keys_file": str(admin_keys)},
        },
    )
    pool = start_pool(procs, config)
    admin = [sys.executable, str(POOLCTL), "--admin", config.admin_address, "--timeout", "60"]
    env = {**os.environ, "BM_POOL_API_KEY": ADMIN_KEY}

    def run(*args: str, environment: dict[str, str] = env) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*admin, *args], capture_output=True, text=True, timeout=120, env=environment)

    with_client_key = run("scale", "0", "2", environment={**os.environ, "BM_POOL_API_KEY": CLIENT_KEY})
    assert with_client_key.returncode == 6 and "UNAUTHENTICATED" in with_client_key.stderr
    scaled = run("scale", "0", "2")
    assert (scaled.returncode, scaled.stdout) == (0, "device 0: 1 -> 2 workers\n"), scaled.stderr
    status = run("--json", "status")
    assert status.returncode == 0, status.stderr
    assert sorted(w["state"] for w in json.loads(status.stdout)) == ["idle", "idle"]
    wait_until(
        lambda: "refused a call to /pool.admin.PoolAdmin/Scale" in pool.supervisor.log(), "the refusal logged"
    )
    assert ADMIN_KEY not in pool.supervisor.log() and CLIENT_KEY not in pool.supervisor.log()
