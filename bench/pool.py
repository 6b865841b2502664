"""A router and paced workers as real subprocesses on loopback, for benchmarks and integration tests.

Each pool gets free ports and its own config file in a scratch folder; the router can be pinned to
its own cores, the workers (and, by the caller, the client) to the others, so that the router's
figures are its own. Process output goes to log files in the scratch folder, whose tails are shown
when a process fails to come up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from common.config import PacedConfig
from router.metrics import NAMESPACE

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0  # 128 workers starting on 2 busy cores take a while
STOP_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 2000
SCRAPE_TIMEOUT_S = 10.0
MB = 1 << 20
# Paced workers stand in for chips, which would not take CPU from the host: at a lower priority
# their wake-ups (hundreds at once in the big scenarios) do not delay the client measuring them.
WORKER_NICENESS = 10


@dataclass(frozen=True)
class RouterState:
    """The router's own view, from its Prometheus gauges (read on its event loop: consistent)."""

    queued: int
    running: int
    idle_workers: int
    busy_workers: int


@dataclass(frozen=True)
class PoolSpec:
    workers: int
    paced: PacedConfig = field(default_factory=PacedConfig)
    queue_size: int = 256
    queue_timeout_s: float = 600.0
    event_loop: str = "uvloop"  # router.event_loop
    # Cores for each process; None = those of the process that starts the pool (inherited).
    router_cpus: frozenset[int] | None = None
    worker_cpus: frozenset[int] | None = None
    security: dict | None = None  # the config's `security:` section (TLS, API keys, CURVE)
    client_credentials: grpc.ChannelCredentials | None = None  # how to reach a TLS front


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pin_process(pid: int, cpus: frozenset[int]) -> None:
    """Pin every thread of a process (threads it starts later inherit their creator's affinity)."""
    for thread in _threads(pid):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(thread, cpus)


def lower_priority(pid: int, niceness: int) -> None:
    """Renice every thread of a process (Linux nice values are per thread; new ones inherit)."""
    for thread in _threads(pid):
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, thread, niceness)


def _threads(pid: int) -> list[int]:
    return [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]


def split_cpus() -> tuple[frozenset[int], frozenset[int]]:
    """(one core for the router, the rest for workers and client); with one core they share it."""
    cpus = sorted(os.sched_getaffinity(0))
    router = frozenset(cpus[:1])
    return router, frozenset(cpus[1:]) or router


def worker_id(index: int) -> str:
    return f"bench-w{index}"


class PacedPool:
    """`with PacedPool(spec, scratch) as pool:` a running router with spec.workers registered."""

    def __init__(self, spec: PoolSpec, scratch: Path) -> None:
        self.spec = spec
        self.scratch = scratch
        self.addr = f"127.0.0.1:{free_port()}"
        self.zmq_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        self.http_url = f"http://127.0.0.1:{free_port()}"  # the OpenAI-compatible front
        self.admin_addr = f"127.0.0.1:{free_port()}"
        self.config_path = scratch / "pool.yaml"
        self.router: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    def __enter__(self) -> PacedPool:
        self.scratch.mkdir(parents=True, exist_ok=True)
        try:
            self._write_config()
            self.router = self._spawn("router", ["-m", "router", "--config", str(self.config_path)])
            if self.spec.router_cpus:
                pin_process(self.router.pid, self.spec.router_cpus)
            self._wait_until(self._router_listens, "the router to listen")
            self.add_workers(self.spec.workers)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def router_process(self) -> psutil.Process:
        if self.router is None:
            raise RuntimeError("the pool is not running")
        return psutil.Process(self.router.pid)

    def worker_ids(self) -> list[str]:
        return [worker_id(index) for index in range(len(self.workers))]

    def add_workers(self, count: int) -> None:
        """Start `count` more workers and wait until the router has welcomed them all."""
        for index in range(len(self.workers), len(self.workers) + count):
            worker = self._spawn(worker_id(index), [
                "-m", "worker", "--config", str(self.config_path), "--dev-id", "0",
                "--index", str(index), "--worker-id", worker_id(index),
            ])  # fmt: skip
            if self.spec.worker_cpus:
                pin_process(worker.pid, self.spec.worker_cpus)
            lower_priority(worker.pid, WORKER_NICENESS)
            self.workers.append(worker)
        self._wait_until(self._all_registered, "the workers to register")

    def state(self) -> RouterState:
        with urllib.request.urlopen(self.metrics_url, timeout=SCRAPE_TIMEOUT_S) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == f"{NAMESPACE}_worker_state" and sample.value:
                    key = f"workers_{sample.labels['state']}"
                    values[key] = values.get(key, 0) + 1
                elif sample.name in (f"{NAMESPACE}_queue_length", f"{NAMESPACE}_requests_running"):
                    values[sample.name] = sample.value
        return RouterState(
            queued=int(values[f"{NAMESPACE}_queue_length"]),
            running=int(values[f"{NAMESPACE}_requests_running"]),
            idle_workers=int(values.get("workers_idle", 0)),
            busy_workers=int(values.get("workers_busy", 0)),
        )

    async def wait_until_idle(self, timeout_s: float = 30.0) -> None:
        """Until nothing is queued or running (cancelled generations have been confirmed)."""
        deadline = time.monotonic() + timeout_s
        while (state := await asyncio.to_thread(self.state)).queued or state.running:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pool did not become idle within {timeout_s:.0f} s: {state}")
            await asyncio.sleep(0.1)

    def workers_cpu_seconds(self) -> float:
        """CPU time all workers have used so far (user + system)."""
        total = 0.0
        for worker in self.workers:
            times = psutil.Process(worker.pid).cpu_times()
            total += times.user + times.system
        return total

    def memory(self) -> dict[str, float]:
        """Resident memory of the router and of the workers (RSS counts shared pages in each; USS
        is what each process alone holds)."""
        workers = [psutil.Process(worker.pid).memory_full_info() for worker in self.workers]
        return {
            "router_rss_mb": self.router_process().memory_info().rss / MB,
            "workers": len(workers),
            "worker_rss_mb_each": max(info.rss for info in workers) / MB if workers else 0.0,
            "workers_uss_mb_total": sum(info.uss for info in workers) / MB,
        }

    def stop(self) -> None:
        """SIGTERM everything, workers first; SIGKILL what is still alive after the timeout."""
        processes = [*self.workers, *([self.router] if self.router else [])]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.workers.clear()
        self.router = None

    def _write_config(self) -> None:
        config = {
            "router": {
                "listen": self.addr,
                "zmq_bind": self.zmq_endpoint,
                "queue_size": self.spec.queue_size,
                "queue_timeout_s": self.spec.queue_timeout_s,
                "event_loop": self.spec.event_loop,
                "metrics_listen": self.metrics_url.removeprefix("http://").removesuffix("/metrics"),
            },
            "admin": {"listen": self.admin_addr},
            "model": {
                "name": "paced",
                "engine": "paced",
                # Streams as long as the pace says; nothing else cuts them short.
                "context_size": self.spec.paced.tokens_per_request + 4096,
                "defaults": {"max_new_tokens": self.spec.paced.tokens_per_request},
                "paced": {
                    "tokens_per_second": self.spec.paced.tokens_per_second,
                    "first_token_delay_s": self.spec.paced.first_token_delay_s,
                    "tokens_per_request": self.spec.paced.tokens_per_request,
                },
            },
            "workers": {"devices": [0], "per_device": 1},
            "http": {"listen": self.http_url.removeprefix("http://")},
        }
        if self.spec.security is not None:
            config["security"] = self.spec.security
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    def _log_path(self, name: str) -> Path:
        return self.scratch / f"{name}.log"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        with self._log_path(name).open("wb") as log:
            return subprocess.Popen(
                [sys.executable, *args], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
            )

    def _all_registered(self) -> bool:
        try:
            state = self.state()
        except OSError:
            return False
        return state.idle_workers + state.busy_workers == len(self.workers)

    def _router_listens(self) -> bool:
        credentials = self.spec.client_credentials
        channel = (
            grpc.secure_channel(self.addr, credentials) if credentials else grpc.insecure_channel(self.addr)
        )
        with channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
            except grpc.FutureTimeoutError:
                return False
        return True

    def _wait_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not condition():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {START_TIMEOUT_S:.0f} s waiting for {what}")
            time.sleep(0.1)

    def _check_alive(self) -> None:
        named = [("router", self.router), *zip(self.worker_ids(), self.workers, strict=True)]
        for name, process in named:
            if process is not None and process.poll() is not None:
                log = self._log_path(name).read_text(errors="replace")[-LOG_TAIL_CHARS:]
                raise RuntimeError(f"{name} exited with code {process.returncode}; its log ends:\n{log}")
