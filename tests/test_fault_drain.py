"""Graceful drain on SIGTERM: the router stops accepting (health NOT_SERVING, new calls UNAVAILABLE),
lets in-flight streams finish up to router.drain_timeout_s, then the pool stops and exits 0.
"""

from __future__ import annotations

import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2

from protos import inference_pb2 as api
from tests.fault_clients import (
    LiveStream,
    assert_complete,
    assert_failed,
    echo_settings,
    run_streams,
    start_echo_pool,
    unique_prompt,
)
from tests.harness import (
    health_status,
    inference_stub,
    open_channel,
    start_worker,
    wait_serving,
    wait_until,
    write_config,
)

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_sigint_drains_in_flight_streams_refuses_new_calls_and_the_pool_exits_zero(
    procs, tmp_path, signum
):
    pool = start_echo_pool(
        procs, tmp_path, router={"drain_timeout_s": 30.0}, tokens_per_second=20.0, tokens_per_request=100
    )
    stub = inference_stub(pool.channel)
    in_flight = [LiveStream(stub, unique_prompt("in-flight")) for _ in range(2)]
    for stream in in_flight:
        stream.wait_frames(2)

    pool.supervisor.signal(signum)
    wait_until(lambda: health_status(pool.config.grpc_address) == NOT_SERVING, "health NOT_SERVING")
    (refused,) = run_streams(stub, [unique_prompt("too-late")])
    assert_failed(refused, grpc.StatusCode.UNAVAILABLE, "the router is shutting down (draining)")
    assert all(stream.outcome.code is None for stream in in_flight), "a stream ended before the checks"

    for stream in in_flight:
        assert_complete(stream.result(), finish=api.STOP)
        assert stream.outcome.frames[-1].token_usage == 100
    assert pool.supervisor.wait() == 0
    log = pool.supervisor.log()
    assert log.index("draining: 2 open calls") < log.index("router stopped") < log.index("stopping 2 workers")
    assert "SIGKILL" not in log
    assert log.count("SIGTERM: stopping once the current request (if any) is done") == 2


def test_streams_still_running_at_the_drain_timeout_end_with_unavailable_and_are_cancelled(procs, tmp_path):
    settings = echo_settings(
        router={"drain_timeout_s": 1.0},
        workers={"devices": [0]},
        tokens_per_second=20.0,
        tokens_per_request=400,
    )
    config = write_config(tmp_path, settings)
    router = procs.start("router", ["-m", "router", "--config", str(config.path)])
    worker = start_worker(procs, config, 0)
    wait_serving(config.grpc_address, router)
    with open_channel(config.grpc_address) as channel:
        endless = LiveStream(inference_stub(channel), unique_prompt("endless"))
        endless.wait_frames(2)
        router.signal(signal.SIGTERM)
        outcome = endless.result()
    assert_failed(outcome, grpc.StatusCode.UNAVAILABLE, "its drain timeout (1 s) ran out")
    assert router.wait() == 0
    assert "drain timeout: ending 1 open calls" in router.log()
    worker.wait_for_log(r"request \w+: cancel received")  # the work stopped with the call
    worker.wait_for_log(r"request \w+: done, cancelled")
