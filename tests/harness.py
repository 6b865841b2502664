"""Integration-test harness: real pool processes on loopback, always cleaned up.

Typical use in a test module (the `procs` fixture, a ProcessSet in tmp_path, is in tests/conftest.py):

    def test_x(procs, tmp_path):
        config = write_config(tmp_path, {"workers": {"devices": [0, 1]}})
        pool = start_pool(procs, config)            # supervisor + router + workers, SERVING
        stub = inference_stub(pool.channel)
        ...

Every process is started with its output in a log file under tmp_path (read it with `.log()`),
in its own process group; leaving the `with` block SIGKILLs whatever is still running, children
of the supervisor included.
"""

from __future__ import annotations

import contextlib
import copy
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import inference_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 90.0  # generous upper bound for anything to happen on a loaded 2-core CI machine (a model load)


_PORTS_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free right now and not handed out before in this test process: the kernel
    may give the same free port to two probes in a row, and a config with two listeners then
    clashes with itself (seen on a busy machine: gRPC and ZeroMQ on one port)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _PORTS_HANDED_OUT:
            _PORTS_HANDED_OUT.add(port)
            return port


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT_S, poll: float = 0.05) -> Any:
    """Poll until `condition()` is truthy and return its value; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


# ---- configuration


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    grpc_address: str  # host:port of the router's gRPC server
    zmq_endpoint: str  # where workers connect
    raw: dict[str, Any]

    @property
    def admin_address(self) -> str:
        return self.raw["admin"]["listen"]


def fast_test_settings(grpc_port: int, zmq_port: int) -> dict[str, Any]:
    """A paced pool with quick heartbeats and backoffs, sized for loopback tests."""
    return {
        "router": {
            "listen": f"127.0.0.1:{grpc_port}",
            "zmq_bind": f"tcp://127.0.0.1:{zmq_port}",
            "heartbeat_interval_s": 0.2,
            "liveness": 3,
            "drain_timeout_s": 5.0,
            "queue_timeout_s": 20.0,
        },
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "model": {
            "name": "paced-test",
            "engine": "paced",
            "context_size": 512,
            "paced": {"tokens_per_second": 50.0, "first_token_delay_s": 0.05, "tokens_per_request": 8},
        },
        "workers": {
            "devices": [0, 1],
            "per_device": 1,
            "restart_backoff_s": 0.1,
            "restart_backoff_max_s": 1.0,
            "stable_after_s": 3.0,
            "stop_grace_s": 4.0,
            "reconnect_backoff_s": 0.05,
            "reconnect_backoff_max_s": 0.5,
        },
        "http": {"listen": f"127.0.0.1:{free_port()}"},  # never the default port 8000: tests run side by side
    }


def write_config(
    directory: Path, overrides: dict[str, Any] | None = None, name: str = "pool.yaml"
) -> ConfigFile:
    """Write fast_test_settings on free loopback ports, with `overrides` merged in section by section."""
    raw = _merged(fast_test_settings(free_port(), free_port()), overrides or {})
    path = directory / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return ConfigFile(path, raw["router"]["listen"], _connect_endpoint(raw["router"]["zmq_bind"]), raw)


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _connect_endpoint(bind: str) -> str:
    return bind.replace("tcp://*:", "tcp://127.0.0.1:").replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")


# ---- processes


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = WAIT_S) -> re.Match[str]:
        """The first match of regex `pattern` in this process's output, waiting for it to appear."""
        return wait_until(
            lambda: re.search(pattern, self.log()), f"{pattern!r} in the log of {self.name}", timeout
        )

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = WAIT_S) -> int:
        """The exit code; fails (with the log) when the process does not exit in time."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout:.0f} s; log:\n{self.log()}"
            ) from None

    def descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.pid).children(recursive=True)
        return []


@dataclass
class ProcessSet:
    """Starts processes for one test and SIGKILLs all of them, and their children, at the end."""

    directory: Path
    processes: list[ManagedProcess] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        log_path = self.directory / f"{name}-{len(self.processes)}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                process_group=0,  # a Ctrl-C in the test terminal must not reach it directly
            )
        process = ManagedProcess(name, popen, log_path)
        self.processes.append(process)
        return process

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.kill_all()

    def kill_all(self) -> None:
        victims: list[psutil.Process] = []
        for process in self.processes:
            victims += process.descendants()
            with contextlib.suppress(psutil.NoSuchProcess):
                victims.append(psutil.Process(process.pid))
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGCONT)  # a stopped process must be able to die
                victim.kill()
        psutil.wait_procs(victims, timeout=10)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(1)


# ---- the pool and its parts


@dataclass
class Pool:
    supervisor: ManagedProcess
    config: ConfigFile
    channel: grpc.Channel

    def worker_processes(self) -> list[psutil.Process]:
        return worker_processes(self.supervisor)

    def router_process(self) -> psutil.Process | None:
        return next((p for p in self.supervisor.descendants() if _module_of(p) == "router"), None)


def start_pool(procs: ProcessSet, config: ConfigFile, workers: int | None = None) -> Pool:
    """The whole pool via `python -m supervisor`; returns once gRPC health says SERVING and the
    expected number of workers (default: all configured) have registered with the router."""
    supervisor = procs.start("supervisor", ["-m", "supervisor", "--config", str(config.path)])
    wait_serving(config.grpc_address, supervisor)
    devices = config.raw["workers"]["devices"]
    expected = len(devices) * config.raw["workers"]["per_device"] if workers is None else workers
    wait_until(
        lambda: len(registered_worker_ids(supervisor)) >= expected, f"{expected} workers registered", WAIT_S
    )
    return Pool(supervisor, config, open_channel(config.grpc_address))


def start_router(procs: ProcessSet, config: ConfigFile) -> ManagedProcess:
    router = procs.start("router", ["-m", "router", "--config", str(config.path)])
    wait_serving(config.grpc_address, router)
    return router


def start_worker(
    procs: ProcessSet, config: ConfigFile, dev_id: int = 0, *extra: str, env: dict[str, str] | None = None
) -> ManagedProcess:
    args = ["-m", "worker", "--config", str(config.path), "--dev-id", str(dev_id), *extra]
    return procs.start(f"worker-dev{dev_id}", args, env)


def registered_worker_ids(process: ManagedProcess) -> set[str]:
    """Workers that logged their registration, in the output of `process` (a supervisor or worker)."""
    return set(re.findall(r"worker (\S+): registered with the router", process.log()))


def worker_processes(supervisor: ManagedProcess) -> list[psutil.Process]:
    return [p for p in supervisor.descendants() if _module_of(p) == "worker"]


def _module_of(process: psutil.Process) -> str | None:
    with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
        cmdline = process.cmdline()
        if "-m" in cmdline:
            return cmdline[cmdline.index("-m") + 1]
    return None


# ---- gRPC


def open_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address)


def inference_stub(channel: grpc.Channel) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(channel)


def health_status(address: str) -> int | None:
    """The overall ("") health status, or None when the server does not answer."""
    with open_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        except grpc.RpcError:
            return None
    return reply.status


def wait_serving(address: str, process: ManagedProcess, timeout: float = WAIT_S) -> None:
    def serving() -> bool:
        if process.popen.poll() is not None:
            raise AssertionError(
                f"{process.name} exited with {process.popen.returncode}; log:\n{process.log()}"
            )
        return health_status(address) == health_pb2.HealthCheckResponse.SERVING

    wait_until(serving, f"{address} to report SERVING", timeout, poll=0.1)
