"""How fast the operators' commands take effect on a loaded pool: `python -m bench.operations`.

A real pool (`python -m supervisor`: router, host agent, workers) on one device with one worker,
kept busy by a closed loop of streaming clients (more clients than workers, so requests queue).
Each round:

- scale +1: `scale 0 2` through the admin API; measured from the call until the call returned (the
  new worker registered) and until the first frame a client received from the new worker (it took
  a queued request);
- drain: `drain 0`; measured from the call until the device was idle and empty (its workers
  finished their requests and left);
- then `scale 0 1` brings the device back for the next round.

Run for the paced engine (chip-like pace, no model to load) and the numpy engine (SmolLM2-135M,
loaded by the new worker). Prints the figures; BENCHMARKS.md has them.

    python -m bench.operations                       # both engines, 3 rounds each
    python -m bench.operations --engine paced --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

from bench.pool import free_port
from protos import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 3
START_TIMEOUT_S = 180.0
ENGINES = {
    # One BM1684X serving Qwen-7B int4: ~0.7 s to the first token, ~10 tokens/s.
    "paced": {
        "name": "paced",
        "engine": "paced",
        "paced": {"tokens_per_second": 10.0, "first_token_delay_s": 0.7, "tokens_per_request": 32},
    },
    "numpy": {"name": "smollm2", "engine": "numpy", "path": "builtin:smollm2", "threads": 1},
}
MAX_NEW_TOKENS = {"paced": 32, "numpy": 24}


@dataclass
class FirstFrames:
    """When each worker first sent a frame to one of the clients (time.monotonic())."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    first: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def saw(self, worker_id: str) -> None:
        with self.lock:
            self.first.setdefault(worker_id, time.monotonic())

    def first_of(self, worker_id: str) -> float | None:
        with self.lock:
            return self.first.get(worker_id)


def _client(address: str, max_new_tokens: int, frames: FirstFrames, stop: threading.Event) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    request = inference_pb2.CompletionRequest(
        history=[inference_pb2.ChatMessage(role=1, content="Tell me about the sea.")],
        max_new_tokens=max_new_tokens,
        temperature=0.0,
    )
    while not stop.is_set():
        try:
            for frame in stub.StreamComplete(request, timeout=120):
                frames.saw(frame.worker_id)
        except grpc.RpcError as error:
            frames.errors.append(f"{error.code().name}: {error.details()}")


def _write_config(directory: Path, engine: str) -> tuple[Path, str, str]:
    address, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = {
        "router": {
            "listen": address,
            "zmq_bind": f"tcp://127.0.0.1:{free_port()}",
            "heartbeat_interval_s": 0.5,
        },
        "admin": {"listen": admin},
        "model": ENGINES[engine],
        "workers": {"devices": [0], "per_device": 1},
    }
    path = directory / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path, address, admin


def _wait(condition: object, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _device_workers(admin: admin_pb2_grpc.PoolAdminStub) -> list[admin_pb2.WorkerStatus]:
    status = admin.Status(admin_pb2.StatusRequest(), timeout=10)
    return [w for w in status.workers if w.device_id == "0" and w.state in ("idle", "busy")]


def measure(engine: str, rounds: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"scale_returned_s": [], "first_served_s": [], "drain_s": []}
    with tempfile.TemporaryDirectory() as scratch:
        path, address, admin_address = _write_config(Path(scratch), engine)
        log = (Path(scratch) / "pool.log").open("wb")
        pool = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "--config", str(path)], cwd=REPO, stdout=log, stderr=log
        )
        stop = threading.Event()
        frames = FirstFrames()
        try:
            admin = admin_pb2_grpc.PoolAdminStub(grpc.insecure_channel(admin_address))
            _wait(lambda: _answers(admin) and len(_device_workers(admin)) == 1, "the pool")
            clients = [
                threading.Thread(
                    target=_client, args=(address, MAX_NEW_TOKENS[engine], frames, stop), daemon=True
                )
                for _ in range(CLIENTS)
            ]
            for client in clients:
                client.start()
            for _ in range(rounds):
                _wait(lambda: any(frames.first_of(w.worker_id) for w in _device_workers(admin)), "load")
                before = {w.worker_id for w in _device_workers(admin)}
                started = time.monotonic()
                reply = admin.Scale(admin_pb2.ScaleRequest(device_id="0", workers=2), timeout=START_TIMEOUT_S)
                figures["scale_returned_s"].append(time.monotonic() - started)
                (new,) = {w.worker_id for w in reply.status.workers if w.device_id == "0"} - before
                _wait(lambda new=new: frames.first_of(new), f"{new} to serve")
                figures["first_served_s"].append(frames.first_of(new) - started)
                started = time.monotonic()
                for _ in admin.Drain(admin_pb2.DeviceRequest(device_id="0"), timeout=START_TIMEOUT_S):
                    pass
                figures["drain_s"].append(time.monotonic() - started)
                admin.Scale(admin_pb2.ScaleRequest(device_id="0", workers=1), timeout=START_TIMEOUT_S)
        finally:
            stop.set()
            pool.terminate()
            pool.wait(60)
            log.close()
        if frames.errors:
            print(f"{engine}: {len(frames.errors)} client errors, e.g. {frames.errors[0]}", file=sys.stderr)
    return figures


def _answers(admin: admin_pb2_grpc.PoolAdminStub) -> bool:
    try:
        admin.Status(admin_pb2.StatusRequest(), timeout=2)
    except grpc.RpcError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operations", description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=(*ENGINES, "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engines = list(ENGINES) if args.engine == "both" else [args.engine]
    header = f"{'engine':8} {'figure':37} {'median':>8} {'min':>8} {'max':>8}"
    print(f"{header}   ({args.rounds} rounds, {CLIENTS} clients)")
    for engine in engines:
        for name, values in measure(engine, args.rounds).items():
            label = {
                "scale_returned_s": "scale +1: call returned (registered)",
                "first_served_s": "scale +1: new worker's first frame",
                "drain_s": "drain: device idle and empty",
            }[name]
            spread = f"{statistics.median(values):7.2f}s {min(values):7.2f}s {max(values):7.2f}s"
            print(f"{engine:8} {label:37} {spread}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
