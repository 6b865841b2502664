"""common/security.py: key loading, rotation and refusal paths, on a real router on loopback (gRPC with
TLS and API keys, the worker socket with CURVE) and with the real key generation command."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
import zmq
import zmq.auth
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from zmq.utils.monitor import parse_monitor_message

from common.config import CurveConfig, SecurityConfig, TlsConfig
from common.security import (
    KEY_NEEDED_MESSAGE,
    ApiKeys,
    CurveClient,
    FrontSecurity,
    RateLimitedWarning,
    SecurityError,
    TlsFiles,
    bearer_key,
    check_worker_link,
    fingerprint,
    is_loopback,
    load_keypair,
    warn_if_plaintext,
)
from protos import inference_pb2_grpc
from router.server import LIVENESS_SERVICE, RouterServer
from router.validation import RequestLimits
from tests.harness import WAIT_S, inference_stub, start_pool, write_config
from tests.router_harness import (
    EmulatedWorker,
    async_test,
    eventually,
    expect_status,
    free_port,
    read_all,
    request,
    router_config,
    workers,
)
from tests.security_keys import (
    GOOD_KEY,
    KEYGEN,
    OTHER_KEY,
    WRONG_KEY,
    TlsFilesForTest,
    make_curve_keypair,
    make_tls,
    write_api_keys,
)

# ---- API keys


def test_api_keys_several_at_once_comments_and_blank_lines(tmp_path):
    keys = ApiKeys(str(write_api_keys(tmp_path / "keys", GOOD_KEY, "", OTHER_KEY)))
    assert keys.count == 2
    assert keys.allows(GOOD_KEY) and keys.allows(OTHER_KEY)
    assert not keys.allows(WRONG_KEY)
    assert not keys.allows(GOOD_KEY[:-1])  # a prefix is not the key
    assert not keys.allows(GOOD_KEY + "x")
    assert not keys.allows(None)
    assert not keys.allows("")


def test_api_key_rotation_by_reload(tmp_path):
    path = write_api_keys(tmp_path / "keys", GOOD_KEY)
    keys = ApiKeys(str(path))
    write_api_keys(path, GOOD_KEY, OTHER_KEY)  # step 1: the new key beside the old
    assert keys.reload() and keys.allows(GOOD_KEY) and keys.allows(OTHER_KEY)
    write_api_keys(path, OTHER_KEY)  # step 2: the old one removed
    assert keys.reload() and keys.allows(OTHER_KEY) and not keys.allows(GOOD_KEY)


@pytest.mark.parametrize("content", ["", "# only a comment\n\n", "short-key\n", f"{GOOD_KEY} trailing\n"])
def test_a_bad_key_file_fails_at_load_and_a_bad_reload_keeps_the_keys(tmp_path, content, caplog):
    bad = tmp_path / "bad"
    bad.write_text(content)
    with pytest.raises(SecurityError) as caught:
        ApiKeys(str(bad))
    assert str(bad) in str(caught.value)
    assert "short-key" not in str(caught.value)  # the error names the line, never the key
    path = write_api_keys(tmp_path / "keys", GOOD_KEY)
    keys = ApiKeys(str(path))
    path.write_text(content)
    with caplog.at_level(logging.ERROR, "security"):
        assert not keys.reload()
    assert keys.allows(GOOD_KEY)
    assert "keeping the current 1 keys" in caplog.text


def test_an_unreadable_key_file_names_the_file(tmp_path):
    with pytest.raises(SecurityError, match=r"cannot read the API key file .*missing"):
        ApiKeys(str(tmp_path / "missing"))


def test_logs_show_fingerprints_never_keys(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "security"):
        keys = ApiKeys(str(write_api_keys(tmp_path / "keys", GOOD_KEY)))
        keys.refused("/x", "ipv4:127.0.0.1:1", WRONG_KEY)
    assert fingerprint(GOOD_KEY) in caplog.text and fingerprint(WRONG_KEY) in caplog.text
    assert GOOD_KEY not in caplog.text and WRONG_KEY not in caplog.text


def test_a_world_readable_key_file_is_warned_about(tmp_path, caplog):
    path = write_api_keys(tmp_path / "keys", GOOD_KEY)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, "security"):
        ApiKeys(str(path))
    assert "can be read by other users" in caplog.text


def test_refusal_logs_are_rate_limited(caplog):
    warn = RateLimitedWarning(interval_s=3600)
    with caplog.at_level(logging.WARNING, "security"):
        for attempt in range(100):
            warn("refused peer %d", attempt)
    assert [record.getMessage() for record in caplog.records] == ["refused peer 0"]


@pytest.mark.parametrize(
    ("header", "key"),
    [
        (f"Bearer {GOOD_KEY}", GOOD_KEY),
        (f"bearer {GOOD_KEY}", GOOD_KEY),
        (f"Bearer   {GOOD_KEY} ", GOOD_KEY),
        ("Bearer ", None),
        (f"Basic {GOOD_KEY}", None),
        (GOOD_KEY, None),
        (None, None),
    ],
)
def test_bearer_key(header, key):
    assert bearer_key(header) == key


# ---- addresses


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("tcp://127.0.0.1:1", True),
        ("tcp://127.3.4.5:1", True),
        ("localhost:1", True),
        ("[::1]:1", True),
        ("ipc:///tmp/x", True),
        ("0.0.0.0:1", False),
        ("tcp://*:1", False),
        ("tcp://198.18.0.1:1", False),
        ("router.example:1", False),
    ],
)
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_a_worker_link_off_loopback_needs_curve_or_trusted_network():
    with pytest.raises(SecurityError, match=r"without CURVE.*trusted_network"):
        check_worker_link("tcp://0.0.0.0:18100", SecurityConfig())
    check_worker_link("tcp://0.0.0.0:18100", SecurityConfig(trusted_network=True))
    check_worker_link("tcp://0.0.0.0:18100", SecurityConfig(curve=CurveConfig(enabled=True)))
    check_worker_link("tcp://127.0.0.1:18100", SecurityConfig())


@async_test
async def test_the_router_refuses_a_plain_worker_bind_off_loopback():
    config = router_config(zmq_bind="tcp://0.0.0.0:18199")
    server = RouterServer(config, RequestLimits(1 << 20, 512), security=SecurityConfig())
    with pytest.raises(SecurityError, match="without CURVE"):
        await server.start()


def test_the_worker_refuses_a_plain_link_off_loopback(tmp_path):
    config = tmp_path / "pool.yaml"
    config.write_text("model: {engine: paced}\n")
    worker = subprocess.run(
        [sys.executable, "-m", "worker", "--config", str(config), "--router", "tcp://router.invalid:1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=KEYGEN.parents[1],
    )
    assert worker.returncode == 2
    assert "without CURVE" in worker.stderr


def test_a_plain_front_off_loopback_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, "security"):
        warn_if_plaintext("gRPC", "127.0.0.1:18000", TlsConfig())
        assert not caplog.records
        warn_if_plaintext("gRPC", "0.0.0.0:18000", TlsConfig())
    assert "without TLS" in caplog.text


# ---- TLS files


def test_tls_refuses_a_key_that_does_not_match_the_certificate(tmp_path):
    first, second = make_tls(tmp_path / "a"), make_tls(tmp_path / "b")
    config = TlsConfig(cert_file=str(first.server_cert), key_file=str(second.server_key))
    with pytest.raises(SecurityError, match="not a usable PEM"):
        TlsFiles(config)


def test_tls_config_wants_cert_and_key_together():
    with pytest.raises(ValueError, match="set together"):
        TlsConfig(cert_file="x.pem")
    with pytest.raises(ValueError, match="needs cert_file"):
        TlsConfig(client_ca_file="ca.pem")


# ---- the gRPC front on loopback


def tls_config(files: TlsFilesForTest, *, mutual: bool = False) -> TlsConfig:
    return TlsConfig(
        cert_file=str(files.server_cert),
        key_file=str(files.server_key),
        client_ca_file=str(files.ca_cert) if mutual else None,
    )


@contextlib.asynccontextmanager
async def secured_router(security: SecurityConfig) -> AsyncIterator[RouterServer]:
    server = RouterServer(router_config(), RequestLimits(1 << 20, 512), security=security)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def tls_channel(server: RouterServer, files: TlsFilesForTest, client_cert: bool = False) -> grpc.aio.Channel:
    key, chain = files.client_pair() if client_cert else (None, None)
    credentials = grpc.ssl_channel_credentials(files.ca_bytes(), key, chain)
    return grpc.aio.secure_channel(f"localhost:{server.grpc_port}", credentials)


def refused_count(server: RouterServer, reason: str) -> float:
    return server.metrics.registry.get_sample_value("bm_pool_refused_total", {"reason": reason}) or 0.0


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def stream_through(server: RouterServer, channel: grpc.aio.Channel, **call: Any) -> str:
    """Stream one request through an emulated worker; returns the text the client got."""
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    async with workers(server.zmq_endpoint, "w1") as (worker,):
        stream = stub.StreamComplete(request("hi"), **call)
        await worker.serve(await worker.next_generate(), ["he", "llo"])
        return "".join(frame.output_text for frame in await read_all(stream))


@async_test
async def test_tls_and_api_key_right_key_streams_wrong_or_no_key_is_unauthenticated(tmp_path):
    files = make_tls(tmp_path)
    keys = write_api_keys(tmp_path / "keys", GOOD_KEY)
    security = SecurityConfig(tls=tls_config(files), api_keys_file=str(keys))
    async with secured_router(security) as server, tls_channel(server, files) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))  # open: no key
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await stream_through(server, channel, metadata=bearer(GOOD_KEY)) == "hello"
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for metadata in (bearer(WRONG_KEY), (), (("authorization", GOOD_KEY),)):
            details = await expect_status(
                read_all(stub.StreamComplete(request("x"), metadata=metadata)),
                grpc.StatusCode.UNAUTHENTICATED,
            )
            assert details == KEY_NEEDED_MESSAGE
        unary = stub.Complete(request("x"), metadata=bearer(WRONG_KEY))
        await expect_status(unary, grpc.StatusCode.UNAUTHENTICATED)
        assert server.snapshot().open_calls == 0  # no refused call reached the scheduler
        assert refused_count(server, "api_key") == 4


@async_test
async def test_chat_script_calls_a_tls_front_with_the_key_from_its_environment(tmp_path):
    files = make_tls(tmp_path)
    keys = write_api_keys(tmp_path / "keys", GOOD_KEY)
    security = SecurityConfig(tls=tls_config(files), api_keys_file=str(keys))
    async with secured_router(security) as server, workers(server.zmq_endpoint, "w1") as (worker,):
        chat = await asyncio.create_subprocess_exec(
            sys.executable, str(KEYGEN.parent / "chat.py"), "hi", "--addr", f"localhost:{server.grpc_port}",
            "--ca", str(files.ca_cert), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "BM_POOL_API_KEY": GOOD_KEY},
        )  # fmt: skip
        await worker.serve(await worker.next_generate(), ["he", "llo"])
        out, _ = await chat.communicate()
        assert chat.returncode == 0 and out.decode().strip() == "hello"


@async_test
async def test_a_plaintext_client_cannot_talk_to_a_tls_front(tmp_path):
    files = make_tls(tmp_path)
    async with (
        secured_router(SecurityConfig(tls=tls_config(files))) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        await expect_status(call, grpc.StatusCode.UNAVAILABLE)


@async_test
async def test_health_needs_a_key_when_not_open_and_the_plain_health_port_serves_probes(tmp_path):
    files = make_tls(tmp_path)
    keys = write_api_keys(tmp_path / "keys", GOOD_KEY)
    security = SecurityConfig(tls=tls_config(files), api_keys_file=str(keys), open_health=False)
    config = router_config(health_listen=f"127.0.0.1:{free_port()}")
    server = RouterServer(config, RequestLimits(1 << 20, 512), security=security)
    await server.start()
    try:
        async with tls_channel(server, files) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await expect_status(
                health.Check(health_pb2.HealthCheckRequest()), grpc.StatusCode.UNAUTHENTICATED
            )
            await health.Check(health_pb2.HealthCheckRequest(), metadata=bearer(GOOD_KEY))
        # The probe port: plain text, health only (what Kubernetes' gRPC probe can reach).
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as plain:
            probe = await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest())
            assert probe.status == health_pb2.HealthCheckResponse.NOT_SERVING  # no worker: not ready
            alive = health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE)
            probe = await health_pb2_grpc.HealthStub(plain).Check(alive)
            assert probe.status == health_pb2.HealthCheckResponse.SERVING  # but alive: no restart
            stub = inference_pb2_grpc.InferenceServiceStub(plain)
            await expect_status(stub.Complete(request("x")), grpc.StatusCode.UNIMPLEMENTED)
    finally:
        await server.stop()


@async_test
async def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path):
    files = make_tls(tmp_path)
    stranger = make_tls(tmp_path / "stranger")  # a certificate another CA signed
    async with secured_router(SecurityConfig(tls=tls_config(files, mutual=True))) as server:
        async with tls_channel(server, files) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            await expect_status(check, grpc.StatusCode.UNAVAILABLE)
        credentials = grpc.ssl_channel_credentials(files.ca_bytes(), *stranger.client_pair())
        async with grpc.aio.secure_channel(f"localhost:{server.grpc_port}", credentials) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            await expect_status(check, grpc.StatusCode.UNAVAILABLE)
        async with tls_channel(server, files, client_cert=True) as channel:
            assert await stream_through(server, channel) == "hello"


@async_test
async def test_reload_rotates_api_keys_and_the_certificate(tmp_path):
    files = make_tls(tmp_path / "old")
    keys = write_api_keys(tmp_path / "keys", GOOD_KEY)
    security = SecurityConfig(tls=tls_config(files), api_keys_file=str(keys))
    async with secured_router(security) as server:
        write_api_keys(keys, OTHER_KEY)
        renewed = make_tls(tmp_path / "new")  # a new CA and certificate, copied over the old files
        files.server_cert.write_bytes(renewed.server_cert.read_bytes())
        files.server_key.write_bytes(renewed.server_key.read_bytes())
        server.reload_security()  # what SIGHUP does
        async with tls_channel(server, renewed) as channel:  # a new connection sees the new certificate
            assert await stream_through(server, channel, metadata=bearer(OTHER_KEY)) == "hello"
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            call = stub.Complete(request("x"), metadata=bearer(GOOD_KEY))
            await expect_status(call, grpc.StatusCode.UNAUTHENTICATED)


@async_test
async def test_an_admin_server_takes_its_own_keys(tmp_path):
    """What router/admin.py's server gets: admin keys apart from the clients' keys."""
    security = FrontSecurity.load(
        SecurityConfig(
            api_keys_file=str(write_api_keys(tmp_path / "keys", GOOD_KEY)),
            admin_api_keys_file=str(write_api_keys(tmp_path / "admin_keys", OTHER_KEY)),
            open_health=False,
        )
    )
    admin = grpc.aio.server(interceptors=security.admin_grpc_interceptors())
    health_pb2_grpc.add_HealthServicer_to_server(
        health_aio.HealthServicer(), admin
    )  # any service stands for the admin one
    port = security.add_port(admin, "127.0.0.1:0", "admin")
    await admin.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            await expect_status(
                check(health_pb2.HealthCheckRequest(), metadata=bearer(GOOD_KEY)),
                grpc.StatusCode.UNAUTHENTICATED,
            )
            await check(health_pb2.HealthCheckRequest(), metadata=bearer(OTHER_KEY))
    finally:
        await admin.stop(0)


@async_test
async def test_a_reloaded_certificate_reaches_every_server_that_shares_it(tmp_path):
    """The gRPC front and the admin server share one TlsFiles: a reload must reach both."""
    files = make_tls(tmp_path / "old")
    security = FrontSecurity.load(SecurityConfig(tls=tls_config(files)))
    servers = [grpc.aio.server() for _ in range(2)]
    ports = []
    for server in servers:
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
        ports.append(security.add_port(server, "127.0.0.1:0", "test"))
        await server.start()
    try:
        renewed = make_tls(tmp_path / "new")
        files.server_cert.write_bytes(renewed.server_cert.read_bytes())
        files.server_key.write_bytes(renewed.server_key.read_bytes())
        security.reload()
        for port in ports:
            credentials = grpc.ssl_channel_credentials(renewed.ca_bytes())
            async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        for server in servers:
            await server.stop(0)


# ---- CURVE on the worker socket (loopback)


@pytest.fixture
def curve_keys(tmp_path: Path) -> CurveConfig:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    _, router_secret = make_curve_keypair(tmp_path, "router")
    worker_public, worker_secret = make_curve_keypair(tmp_path, "worker")
    worker_public.rename(allowed / "worker.key")
    make_curve_keypair(tmp_path, "rogue")
    return CurveConfig(
        enabled=True,
        router_secret_key=str(router_secret),
        allowed_workers_dir=str(allowed),
        worker_secret_key=str(worker_secret),
        router_public_key=str(tmp_path / "router.key"),
    )


def rogue_of(curve: CurveConfig) -> CurveConfig:
    folder = Path(curve.worker_secret_key).parent
    return CurveConfig(
        enabled=True,
        worker_secret_key=str(folder / "rogue.key_secret"),
        router_public_key=curve.router_public_key,
    )


def registered(server: RouterServer) -> int:
    snapshot = server.snapshot()
    return snapshot.workers_idle + snapshot.workers_busy


def monitored_before_connect(
    monitors: list[zmq.Socket], events: int, secure: Callable[[zmq.Socket], None] | None = None
) -> Callable[[zmq.Socket], None]:
    """An EmulatedWorker `secure` hook that also attaches a monitor for `events` before the socket
    connects: a handshake can fail before a monitor attached after the connect is listening."""

    def prepare(socket: zmq.Socket) -> None:
        if secure is not None:
            secure(socket)
        monitors.append(socket.get_monitor_socket(events))

    return prepare


@async_test
async def test_curve_an_allowed_worker_registers_and_serves(curve_keys):
    async with (
        secured_router(SecurityConfig(curve=curve_keys)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        worker = EmulatedWorker(server.zmq_endpoint, "w1", secure=CurveClient(curve_keys).secure)
        try:
            await worker.register()
            call = stub.StreamComplete(request("hi"))
            await worker.serve(await worker.next_generate(), ["ok"])
            assert [frame.output_text for frame in await read_all(call)] == ["ok"]
        finally:
            await worker.close()


@async_test
async def test_curve_an_unknown_key_is_refused_at_the_handshake_and_logged(curve_keys, caplog):
    async with secured_router(SecurityConfig(curve=curve_keys)) as server:
        rogue_client = CurveClient(rogue_of(curve_keys))
        with caplog.at_level(logging.WARNING, "security"):
            monitors: list[zmq.Socket] = []
            events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            secure = monitored_before_connect(monitors, events, rogue_client.secure)
            rogue = EmulatedWorker(server.zmq_endpoint, "rogue", secure=secure)
            (monitor,) = monitors
            try:
                rogue.hello()  # queued: it never leaves, the handshake fails first
                event = parse_monitor_message(await monitor.recv_multipart())
                assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                await eventually(lambda: "refused a worker connection" in caplog.text, "the refusal logged")
                assert registered(server) == 0 and refused_count(server, "curve_key") >= 1
                assert rogue.inbox == {}  # not even a Disconnect reached it
            finally:
                monitor.close()
                await rogue.close()
        rogue_public, _ = zmq.auth.load_certificate(rogue_of(curve_keys).worker_secret_key)
        assert fingerprint(rogue_public) in caplog.text and rogue_public.decode() not in caplog.text


@async_test
async def test_curve_a_plain_peer_is_refused_and_logged(curve_keys, caplog):
    caplog.set_level(logging.WARNING, "security")
    async with secured_router(SecurityConfig(curve=curve_keys)) as server:
        monitors: list[zmq.Socket] = []
        secure = monitored_before_connect(monitors, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        plain = EmulatedWorker(server.zmq_endpoint, "plain", secure=secure)
        (monitor,) = monitors
        try:
            plain.hello()
            event = parse_monitor_message(await monitor.recv_multipart())
            assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            assert registered(server) == 0 and plain.inbox == {}
            await eventually(
                lambda: "refused a worker connection: it failed the CURVE handshake" in caplog.text,
                "the refusal logged",
            )
            assert refused_count(server, "curve_handshake") >= 1
        finally:
            monitor.close()
            await plain.close()


@async_test
async def test_curve_allowlist_reload_admits_a_new_key(curve_keys):
    async with secured_router(SecurityConfig(curve=curve_keys)) as server:
        newcomer = rogue_of(curve_keys)
        public = Path(newcomer.worker_secret_key).with_suffix(".key")
        (Path(curve_keys.allowed_workers_dir) / "newcomer.key").write_bytes(public.read_bytes())
        server.reload_security()
        worker = EmulatedWorker(server.zmq_endpoint, "w2", secure=CurveClient(newcomer).secure)
        try:
            await worker.register()
            assert registered(server) == 1
        finally:
            await worker.close()


async def worker_log_until(server: RouterServer, curve: CurveConfig, folder: Path, wanted: str) -> str:
    """Run a real worker process with `curve` against `server` until its log shows `wanted`."""
    config = folder / "worker.yaml"
    security = {"curve": {**asdict(curve), "enabled": True}}
    config.write_text(yaml.safe_dump({"model": {"engine": "paced"}, "security": security}))
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "--config", str(config), "--router", server.zmq_endpoint,
        cwd=KEYGEN.parents[1], stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    log = ""
    try:
        while wanted not in log:
            line = await asyncio.wait_for(worker.stderr.readline(), WAIT_S)
            assert line, f"the worker exited; its log:\n{log}"
            log += line.decode()
    finally:
        worker.terminate()
        await worker.wait()
    return log


@async_test
async def test_a_worker_says_why_its_curve_handshake_fails(curve_keys, tmp_path):
    async with secured_router(SecurityConfig(curve=curve_keys)) as server:
        log = await worker_log_until(
            server, rogue_of(curve_keys), tmp_path, "refused this worker's CURVE key"
        )
        assert registered(server) == 0 and "add its .key file" in log
        wrong_router = replace(curve_keys, router_public_key=str(tmp_path / "rogue.key"))
        await worker_log_until(server, wrong_router, tmp_path, "is router_public_key the router's key")
        assert registered(server) == 0


def test_curve_key_files_missing_or_public_only_are_refused(curve_keys):
    with pytest.raises(SecurityError, match="cannot read the CURVE secret key"):
        load_keypair(curve_keys.worker_secret_key + ".missing")
    with pytest.raises(SecurityError, match="holds no secret key"):
        load_keypair(curve_keys.router_public_key)


# ---- the key generation command


def test_keygen_writes_loadable_keypairs_with_safe_modes_and_never_overwrites(tmp_path):
    public, secret = make_curve_keypair(tmp_path / "keys", "host-a")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    pair = load_keypair(str(secret))
    assert zmq.auth.load_certificate(public) == (pair.public, None)
    assert zmq.curve_public(pair.secret) == pair.public
    again = subprocess.run(
        [sys.executable, str(KEYGEN), "curve", str(tmp_path / "keys"), "host-a"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "exists" in again.stderr
    assert load_keypair(str(secret)) == pair


def test_keygen_api_key_is_long_and_accepted(tmp_path):
    made = subprocess.run(
        [sys.executable, str(KEYGEN), "api-key"], capture_output=True, text=True, check=True
    )
    key = made.stdout.strip()
    assert len(key) >= 40 and fingerprint(key) in made.stderr
    assert ApiKeys(str(write_api_keys(tmp_path / "keys", key))).allows(key)


# ---- reload through the processes


def test_sighup_to_the_supervisor_reloads_the_routers_api_keys(procs, tmp_path):
    keys = write_api_keys(tmp_path / "keys", GOOD_KEY)
    config = write_config(tmp_path, {"workers": {"devices": [0]}, "security": {"api_keys_file": str(keys)}})
    pool = start_pool(procs, config)  # health is open: the pool comes up without a key
    stub = inference_stub(pool.channel)
    assert stub.Complete(request("x"), metadata=bearer(GOOD_KEY), timeout=WAIT_S).finished
    write_api_keys(keys, OTHER_KEY)
    pool.supervisor.signal(signal.SIGHUP)
    pool.supervisor.wait_for_log(f"API keys loaded from {keys}: {fingerprint(OTHER_KEY)}")
    with pytest.raises(grpc.RpcError) as refused:
        stub.Complete(request("x"), metadata=bearer(GOOD_KEY), timeout=WAIT_S)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.Complete(request("x"), metadata=bearer(OTHER_KEY), timeout=WAIT_S).finished
    assert GOOD_KEY not in pool.supervisor.log() and OTHER_KEY not in pool.supervisor.log()
