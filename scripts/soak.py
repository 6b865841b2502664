"""Soak the pool under faults: mixed traffic while workers are killed, frozen and thawed, and
clients cancel, for a set time; then count how every request ended.

    .venv/bin/python scripts/soak.py --duration 120
    .venv/bin/python scripts/soak.py --duration 600 --workers 4 --clients 16 --keep-logs /tmp/soak

It starts its own pool (`python -m supervisor`: router + paced workers that echo each request, on
free loopback ports), so every answer can be checked against its request. Traffic: streams with
random lengths; some cancelled by their client mid-way; some carrying a marker that makes the
engine fail (an engine error) or hang (the worker's step watchdog restarts it). Faults: at random
intervals a worker gets SIGKILL, or SIGSTOP then SIGCONT a moment later. With --operate-every S, an
operator also reshapes the pool through the admin API at random intervals: scales a device up or
down, cordons, uncordons or drains it (device 0 keeps at least one worker, so someone serves).

Printed at the end: requests sent, completed, cancelled by their client, failed by status, lost
(no complete stream and no explicit status: a hang, a stream cut without a status, or text that
is not the request's own), worker restarts, router RSS at the start and the end. Exit status 0
when nothing was lost, 1 otherwise. Not part of `make test`: it runs as long as it is told.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: make `protos` importable

from protos import admin_pb2, admin_pb2_grpc, inference_pb2_grpc  # noqa: E402
from protos import inference_pb2 as api  # noqa: E402

FAIL_MARKER = "FAIL"
HANG_MARKER = "HANG"
TOKENS_PER_REQUEST = 24
CALL_TIMEOUT_S = 120.0  # a client deadline: a call still open then was hung by the pool
START_TIMEOUT_S = 60.0
MAX_DURATION_S = 24 * 3600.0
MAX_REQUESTS = 10_000_000


@dataclass(frozen=True)
class Settings:
    duration_s: float
    max_requests: int
    workers: int
    clients: int
    fault_interval_s: float
    cancel_rate: float
    fail_rate: float
    hang_rate: float
    seed: int
    keep_logs: Path | None
    operation_interval_s: float | None  # None: no operator


# ---- the pool


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pool_config(settings: Settings) -> dict:
    """A paced, echoing pool on loopback with short heartbeats, quick restarts and fault markers."""
    return {
        "router": {
            "listen": f"127.0.0.1:{free_port()}",
            "zmq_bind": f"tcp://127.0.0.1:{free_port()}",
            "queue_size": 4 * settings.clients,
            "queue_timeout_s": 30.0,
            "heartbeat_interval_s": 0.2,
            "liveness": 5,
            "drain_timeout_s": 5.0,
        },
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "model": {
            "name": "paced-soak",
            "engine": "paced",
            "context_size": 1024,
            "paced": {
                "echo": True,
                "tokens_per_second": 50.0,
                "first_token_delay_s": 0.05,
                "tokens_per_request": TOKENS_PER_REQUEST,
                "fail_marker": FAIL_MARKER,
                "hang_marker": HANG_MARKER,
                "fault_at_token": 3,
            },
        },
        "workers": {
            "devices": list(range(settings.workers)),
            "restart_backoff_s": 0.2,
            "restart_backoff_max_s": 2.0,
            "stable_after_s": 3.0,
            "stop_grace_s": 4.0,
            "reconnect_backoff_s": 0.05,
            "reconnect_backoff_max_s": 0.5,
            "step_timeout_s": 2.0,
        },
        "http": {"listen": f"127.0.0.1:{free_port()}"},  # not the default port: a pool may run beside it
    }


class Pool:
    """`python -m supervisor` on a config in `directory`, its output in supervisor.log there."""

    def __init__(self, directory: Path, config: dict) -> None:
        self.address = config["router"]["listen"]
        self.admin_address = config["admin"]["listen"]
        self.log_path = directory / "supervisor.log"
        config_path = directory / "pool.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "--config", str(config_path)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
            )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, workers: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (
            self._serving() and len(set(re.findall(r"worker (\S+) registered:", self.log()))) >= workers
        ):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the pool did not come up; its log ends:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def _serving(self) -> bool:
        with grpc.insecure_channel(self.address) as channel, contextlib.suppress(grpc.RpcError):
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        return False

    def children(self, module: str) -> list[psutil.Process]:
        found = []
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                    if child.status() != psutil.STATUS_ZOMBIE and module in child.cmdline():
                        found.append(child)
        return found

    def router_rss_mib(self) -> float:
        (router,) = self.children("router")
        return router.memory_info().rss / (1 << 20)

    def stop(self) -> int:
        """SIGTERM (the router drains, then the workers stop); SIGKILL whatever outlives a grace period."""
        for worker in self.children("worker"):
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.send_signal(signal.SIGCONT)  # a frozen worker must be able to stop
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            for child in self.children(""):
                child.kill()
            return self.process.wait()


# ---- the tally


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    engine_errors_in_band: int = 0  # completed streams whose last frame is finish_reason ERROR
    cancelled_by_client: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: list[str] = field(default_factory=list)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, outcome: str, details: str = "") -> None:
        with self.lock:
            if outcome == "completed":
                self.completed += 1
            elif outcome == "engine error in band":
                self.engine_errors_in_band += 1
            elif outcome == "cancelled by the client":
                self.cancelled_by_client += 1
            elif outcome == "lost":
                self.lost.append(details)
            else:
                self.failed[outcome] += 1


# ---- clients


def expected_text(prompt: str, tokens: int) -> str:
    return " ".join(itertools.islice(itertools.cycle(prompt.split()), tokens))


def new_request(settings: Settings, rng: random.Random) -> tuple[str, api.CompletionRequest]:
    """A unique prompt (a fault marker in a few), and a random length for half of the requests."""
    roll = rng.random()
    marker = FAIL_MARKER if roll < settings.fail_rate else ""
    if settings.fail_rate <= roll < settings.fail_rate + settings.hang_rate:
        marker = HANG_MARKER
    prompt = f"{marker}soak-{rng.getrandbits(48):012x}"
    request = api.CompletionRequest(history=[api.ChatMessage(role=1, content=prompt)])
    if rng.random() < 0.5:
        request.max_new_tokens = rng.randint(1, TOKENS_PER_REQUEST)
    return prompt, request


def run_one(
    stub: inference_pb2_grpc.InferenceServiceStub, settings: Settings, rng: random.Random, tally: Tally
) -> None:
    prompt, request = new_request(settings, rng)
    cancel_after = rng.randint(0, TOKENS_PER_REQUEST) if rng.random() < settings.cancel_rate else None
    with tally.lock:
        tally.sent += 1
    call = stub.StreamComplete(request, timeout=CALL_TIMEOUT_S)
    frames: list[api.Completion] = []
    try:
        if cancel_after == 0:  # before any frame: while queued, starting or streaming
            time.sleep(rng.uniform(0.0, 0.3))
            call.cancel()
        for frame in call:
            frames.append(frame)
            if cancel_after is not None and len(frames) >= cancel_after:
                call.cancel()
        tally.count(*judge(prompt, frames))
    except grpc.RpcError as error:
        tally.count(*judge_failure(prompt, frames, error, cancelled=cancel_after is not None))


def judge_failure(
    prompt: str, frames: list[api.Completion], error: grpc.RpcError, *, cancelled: bool
) -> tuple[str, str]:
    """How a call that ended with a status ended: cancelled by its client, failed, or lost."""
    if error.code() == grpc.StatusCode.CANCELLED and cancelled:
        return "cancelled by the client", ""
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and error.details() == "Deadline Exceeded":
        return "lost", f"{prompt}: no end within the client's {CALL_TIMEOUT_S:g} s deadline"
    if not expected_text(prompt, 10**6).startswith("".join(frame.output_text for frame in frames)):
        return "lost", f"{prompt}: another request's text before {error.code().name}"
    return error.code().name, ""


def judge(prompt: str, frames: list[api.Completion]) -> tuple[str, str]:
    """How a stream that ended with status OK ended: completed, in-band error, or lost."""
    if not frames or not frames[-1].finished or any(frame.finished for frame in frames[:-1]):
        return "lost", f"{prompt}: the stream ended OK without exactly one final frame"
    last = frames[-1]
    if last.finish_reason == api.ERROR:
        text = "".join(frame.output_text for frame in frames[:-1])
        if expected_text(prompt, last.token_usage) != text:
            return "lost", f"{prompt}: {text!r} before an in-band error"
        return "engine error in band", ""
    if "".join(frame.output_text for frame in frames) != expected_text(prompt, last.token_usage):
        return "lost", f"{prompt}: the text is not this request's own"
    return "completed", ""


def client_loop(address: str, settings: Settings, seed: int, tally: Tally, stop: threading.Event) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        while not stop.is_set():
            with tally.lock:
                if tally.sent >= settings.max_requests:
                    return
            run_one(stub, settings, rng, tally)


# ---- faults


def fault_loop(
    pool: Pool, settings: Settings, rng: random.Random, tally: Tally, stop: threading.Event
) -> None:
    while not stop.wait(rng.uniform(0.5, 1.5) * settings.fault_interval_s):
        workers = pool.children("worker")
        if not workers:
            continue
        victim = rng.choice(workers)
        with contextlib.suppress(psutil.NoSuchProcess):
            if rng.random() < 0.5:
                victim.kill()
                tally.faults["SIGKILL"] += 1
            else:
                victim.send_signal(signal.SIGSTOP)
                tally.faults["SIGSTOP/SIGCONT"] += 1
                stop.wait(rng.uniform(0.2, 3.0))
                victim.send_signal(signal.SIGCONT)


# ---- an operator


def operator_loop(
    pool: Pool, settings: Settings, rng: random.Random, tally: Tally, stop: threading.Event
) -> None:
    """Scale, cordon, uncordon and drain devices at random through the admin API; every answer must be
    a success (an operation that fails is counted, by kind and status, with the faults)."""
    assert settings.operation_interval_s is not None
    with grpc.insecure_channel(pool.admin_address) as channel:
        admin = admin_pb2_grpc.PoolAdminStub(channel)
        while not stop.wait(rng.uniform(0.5, 1.5) * settings.operation_interval_s):
            device = str(rng.randrange(settings.workers))
            operation = (
                "scale" if device == "0" else rng.choice(("scale", "scale", "cordon", "uncordon", "drain"))
            )
            try:
                if operation == "scale":
                    workers = rng.randint(1 if device == "0" else 0, 3)
                    admin.Scale(admin_pb2.ScaleRequest(device_id=device, workers=workers), timeout=60)
                elif operation == "drain":
                    for _ in admin.Drain(admin_pb2.DeviceRequest(device_id=device), timeout=60):
                        pass
                else:
                    call = admin.Cordon if operation == "cordon" else admin.Uncordon
                    call(admin_pb2.DeviceRequest(device_id=device), timeout=60)
                outcome = f"admin {operation}"
            except grpc.RpcError as error:
                outcome = f"admin {operation} FAILED {error.code().name}: {error.details()}"
            with tally.lock:
                tally.faults[outcome] += 1


# ---- the run


@contextlib.contextmanager
def scratch(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
    else:
        with tempfile.TemporaryDirectory(prefix="soak-") as directory:
            yield Path(directory)


def soak(settings: Settings) -> int:
    with scratch(settings.keep_logs) as directory:
        pool = Pool(directory, pool_config(settings))
        try:
            pool.wait_ready(settings.workers)
            return run_traffic(pool, settings)
        finally:
            code = pool.stop()
            kept = f"; its log: {pool.log_path}" if settings.keep_logs else ""
            print(f"pool stopped, supervisor exit status {code}{kept}")


def run_traffic(pool: Pool, settings: Settings) -> int:
    tally = Tally()
    rss_start = pool.router_rss_mib()
    router_pid = pool.children("router")[0].pid
    stop_clients, stop_faults = threading.Event(), threading.Event()
    rng = random.Random(settings.seed)
    clients = [
        threading.Thread(
            target=client_loop, args=(pool.address, settings, rng.getrandbits(32), tally, stop_clients)
        )
        for _ in range(settings.clients)
    ]
    faults = [threading.Thread(target=fault_loop, args=(pool, settings, rng, tally, stop_faults))]
    if settings.operation_interval_s is not None:
        operator_rng = random.Random(rng.getrandbits(32))
        faults.append(
            threading.Thread(target=operator_loop, args=(pool, settings, operator_rng, tally, stop_faults))
        )
    started = time.monotonic()
    for thread in [*clients, *faults]:
        thread.start()
    while time.monotonic() - started < settings.duration_s and any(c.is_alive() for c in clients):
        time.sleep(0.5)
    stop_faults.set()
    for thread in faults:
        thread.join()
    stop_clients.set()
    for client in clients:  # each finishes its call in flight: the call's deadline bounds the wait
        client.join(CALL_TIMEOUT_S + 10)
    hung = sum(client.is_alive() for client in clients)
    elapsed = time.monotonic() - started
    report(pool, tally, elapsed, rss_start, router_pid, hung)
    return 0 if not tally.lost and not hung else 1


def report(pool: Pool, tally: Tally, elapsed: float, rss_start: float, router_pid: int, hung: int) -> None:
    log = pool.log()
    restarts = len(re.findall(r"worker dev\d+-w\d+ \(pid \d+\) .*; restarting in", log))
    routers = pool.children("router")
    router_now = f"{routers[0].memory_info().rss / (1 << 20):.1f} MiB" if routers else "no router running"
    if routers and routers[0].pid != router_pid:
        router_now += " (a restarted router!)"
    failed = ", ".join(f"{code} {count}" for code, count in sorted(tally.failed.items())) or "none"
    faults = ", ".join(f"{kind} {count}" for kind, count in sorted(tally.faults.items())) or "none"
    print(f"soak: {elapsed:.0f} s, faults injected: {faults}")
    print(f"requests sent:              {tally.sent}")
    in_band = tally.engine_errors_in_band
    print(f"completed:                  {tally.completed} (and {in_band} ended in band with an engine error)")
    print(f"cancelled by their client:  {tally.cancelled_by_client}")
    print(f"failed, by status:          {failed}")
    print(f"lost:                       {len(tally.lost) + hung}")
    for problem in tally.lost[:20]:
        print(f"  {problem}")
    if hung:
        print(f"  {hung} client threads still waiting on a call")
    print(f"re-dispatched requests:     {len(re.findall(r'will run again', log))}")
    print(f"worker restarts:            {restarts}")
    print(f"router RSS:                 {rss_start:.1f} MiB at the start, {router_now} at the end")


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic (default 120)")
    parser.add_argument(
        "--max-requests", type=int, default=MAX_REQUESTS, help="stop after this many requests"
    )
    parser.add_argument("--workers", type=int, default=3, help="paced workers (default 3)")
    parser.add_argument("--clients", type=int, default=12, help="concurrent client streams (default 12)")
    parser.add_argument(
        "--fault-every", type=float, default=4.0, help="mean seconds between faults (default 4)"
    )
    parser.add_argument("--cancel-rate", type=float, default=0.15, help="share of calls the client cancels")
    parser.add_argument(
        "--fail-rate", type=float, default=0.03, help="share of requests with an engine error"
    )
    parser.add_argument(
        "--hang-rate", type=float, default=0.01, help="share of requests whose engine step hangs"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (traffic and faults)")
    parser.add_argument(
        "--operate-every", type=float, help="mean seconds between admin operations (default: none)"
    )
    parser.add_argument(
        "--keep-logs", type=Path, help="write the pool's config and log here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
    if not 0 < args.max_requests <= MAX_REQUESTS:
        parser.error(f"--max-requests must be in 1..{MAX_REQUESTS}")
    if args.operate_every is not None and args.operate_every <= 0:
        parser.error("--operate-every must be > 0")
    if args.workers < 1 or args.clients < 1 or args.fault_every <= 0:
        parser.error("--workers and --clients must be >= 1, --fault-every > 0")
    for name in ("cancel_rate", "fail_rate", "hang_rate"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    return Settings(
        duration_s=args.duration,
        max_requests=args.max_requests,
        workers=args.workers,
        clients=args.clients,
        fault_interval_s=args.fault_every,
        cancel_rate=args.cancel_rate,
        fail_rate=args.fail_rate,
        hang_rate=args.hang_rate,
        seed=args.seed,
        keep_logs=args.keep_logs,
        operation_interval_s=args.operate_every,
    )


def main(argv: list[str] | None = None) -> int:
    return soak(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
