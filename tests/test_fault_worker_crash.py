"""Fault: a worker process dies (SIGKILL), under load, or crashes at every start.

The whole pool runs as real processes (`python -m supervisor`: router + echoing paced workers).
"""

from __future__ import annotations

import os
import re
import signal

import grpc
import psutil
import yaml
from grpc_health.v1 import health_pb2

from tests.fault_clients import (
    ECHO_PACE,
    LiveStream,
    assert_complete,
    assert_failed,
    registrations,
    run_streams,
    start_echo_pool,
    unique_prompt,
    worker_pid,
)
from tests.harness import (
    ManagedProcess,
    Pool,
    health_status,
    inference_stub,
    open_channel,
    wait_serving,
    wait_until,
    write_config,
)

# Long answers take 10 s at this pace; "short" requests ask for 6 tokens (0.3 s).
PACE = {"tokens_per_second": 20.0, "tokens_per_request": 200}
SHORT = {"max_new_tokens": 6}


def live_worker_ids(pool: Pool) -> set[str]:
    """Ids of the workers the router registered whose process is alive now."""
    alive = set()
    for process in pool.worker_processes():
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.add(process.pid)
        except psutil.NoSuchProcess:
            pass
    return {worker_id for worker_id in registrations(pool.supervisor) if worker_pid(worker_id) in alive}


def test_a_worker_killed_mid_stream_fails_only_its_started_stream_and_rejoins(procs, tmp_path):
    pool = start_echo_pool(procs, tmp_path, router={"liveness": 5}, **PACE)
    supervisor = pool.supervisor
    stub = inference_stub(pool.channel)

    # Under load: one long stream under way on the victim, more requests than workers behind it.
    started = LiveStream(stub, unique_prompt("victim"))
    victim = started.wait_frames(2)[0].worker_id
    load = [LiveStream(stub, unique_prompt("load"), **SHORT) for _ in range(6)]
    os.kill(worker_pid(victim), signal.SIGKILL)

    assert_failed(
        started.result(), grpc.StatusCode.UNAVAILABLE, f"worker {victim} was lost", "no message for"
    )
    for stream in load:  # queued or on the other worker: none of them notices
        assert_complete(stream.result())
        assert victim not in stream.outcome.worker_ids

    supervisor.wait_for_log(
        rf"worker dev\d-w0 \(pid {worker_pid(victim)}\) was killed by SIGKILL .*restarting in"
    )
    wait_until(lambda: len(live_worker_ids(pool)) == 2, "the restarted worker registered")

    # A request sent to a worker that died idle, before the router noticed: it has had no token,
    # so it runs again elsewhere once the liveness window shows the worker lost.
    busy = LiveStream(stub, unique_prompt("busy"))
    busy_worker = busy.wait_frames(1)[0].worker_id
    (idle_victim,) = live_worker_ids(pool) - {busy_worker}
    os.kill(worker_pid(idle_victim), signal.SIGKILL)
    unlucky = LiveStream(stub, unique_prompt("unlucky"), **SHORT)
    supervisor.wait_for_log(rf"request \w+ will run again: worker {idle_victim} was lost \(no message for")
    assert_complete(unlucky.result())
    assert idle_victim not in unlucky.outcome.worker_ids
    busy.cancel()

    wait_until(lambda: len(live_worker_ids(pool)) == 2, "the second restarted worker registered")
    for outcome in run_streams(stub, [unique_prompt("after") for _ in range(4)], **SHORT):
        assert_complete(outcome)
    assert supervisor.log().count("was killed by SIGKILL") == 2


def restart_delays(supervisor: ManagedProcess) -> list[float]:
    """The backoffs the supervisor logged for dev0-w0's restarts so far."""
    restarts = r"worker dev0-w0 \(pid \d+\) .*restarting in ([\d.]+) s"
    return [float(delay) for delay in re.findall(restarts, supervisor.log())]


def test_a_worker_crashing_at_every_start_is_held_back_and_reported_and_clients_get_a_status(procs, tmp_path):
    broken_model = {"engine": "numpy", "path": str(tmp_path / "model-not-downloaded.gguf")}
    config = write_config(
        tmp_path,
        {
            "model": broken_model,
            "router": {"queue_timeout_s": 1.0},
            "workers": {
                "devices": [0],
                "restart_backoff_s": 0.05,
                "restart_backoff_max_s": 0.8,
                "crash_loop_after": 3,
                "stable_after_s": 30.0,
            },
        },
    )
    supervisor = procs.start("supervisor", ["-m", "supervisor", "--config", str(config.path)])
    supervisor.wait_for_log(r"serving gRPC on port")
    supervisor.wait_for_log(
        r"worker dev0-w0 is crash-looping: it died 3 times in a row .* holding it back 0.8 s"
    )
    assert (
        "cannot load the numpy engine" in supervisor.log() and "model-not-downloaded.gguf" in supervisor.log()
    )
    assert health_status(config.grpc_address) == health_pb2.HealthCheckResponse.NOT_SERVING
    # The fourth restart is the first one decided after the crash-loop verdict: wait until it is logged
    # (a busy machine may not have got that far yet), then fix the model.
    wait_until(lambda: len(restart_delays(supervisor)) >= 4, "the fourth restart of dev0-w0")
    assert restart_delays(supervisor)[:4] == [0.05, 0.1, 0.8, 0.8], "not held back at the max backoff"

    with open_channel(config.grpc_address) as channel:
        (waited,) = run_streams(inference_stub(channel), [unique_prompt("nobody-home")])
    assert_failed(waited, grpc.StatusCode.DEADLINE_EXCEEDED, "no worker became free before the queue timeout")

    # The operator fixes the model: the worker, held back, comes up at its next restart.
    fixed = {**config.raw, "model": {"name": "fixed", "engine": "paced", "paced": {**ECHO_PACE, **PACE}}}
    staging = config.path.with_suffix(".new")
    staging.write_text(yaml.safe_dump(fixed), encoding="utf-8")
    staging.replace(config.path)
    wait_serving(config.grpc_address, supervisor)
    with open_channel(config.grpc_address) as channel:
        (served,) = run_streams(inference_stub(channel), [unique_prompt("fixed")], **SHORT)
    assert_complete(served)
