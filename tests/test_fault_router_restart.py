"""Fault: the router dies (SIGKILL) under the workers, and a new router comes up on the same ports.

The router and two workers run as separate processes (no supervisor), so the test alone decides
when the router comes back, and can check that the workers were never restarted.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from tests.fault_clients import (
    LiveStream,
    assert_complete,
    echo_settings,
    registrations,
    request,
    run_streams,
    unique_prompt,
)
from tests.harness import (
    inference_stub,
    open_channel,
    start_worker,
    wait_serving,
    wait_until,
    write_config,
)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


# A few seconds, as the issue asks: the workers' reconnect backoff is 0.05-0.5 s in tests.
NEW_REQUEST_DEADLINE_S = 90.0  # the new router starts and a worker registers again: seconds, more when busy
ROUTER_ARGS = ["-m", "router", "--config"]


def test_workers_register_again_with_a_restarted_router_without_being_restarted(procs, tmp_path):
    config = write_config(tmp_path, echo_settings(tokens_per_second=20.0, tokens_per_request=200))
    router = procs.start("router", [*ROUTER_ARGS, str(config.path)])
    workers = [start_worker(procs, config, dev_id) for dev_id in (0, 1)]
    wait_serving(config.grpc_address, router)
    wait_until(lambda: len(set(registrations(router))) == 2, "two workers registered")
    pids = [worker.pid for worker in workers]

    with open_channel(config.grpc_address) as channel:
        cut = LiveStream(inference_stub(channel), unique_prompt("cut"))
        serving = cut.wait_frames(2)[0].worker_id
        router.popen.kill()
        router.wait()
        outcome = cut.result()
    assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome.describe()
    for worker in workers:
        worker.wait_for_log(r"router silent for [\d.]+ s; reconnecting")
    (busy,) = [worker for worker in workers if serving.endswith(f"-{worker.pid}")]
    busy.wait_for_log(r"request \w+: abandoned \(router silent")
    with open_channel(config.grpc_address) as channel:  # nobody listening: new calls fail at once
        down = rpc_error(lambda: list(inference_stub(channel).StreamComplete(request("down"), timeout=30)))
    assert down.code() == grpc.StatusCode.UNAVAILABLE, down.details()

    new_router = procs.start("router", [*ROUTER_ARGS, str(config.path)])
    with open_channel(config.grpc_address) as channel:
        stub = inference_stub(channel)
        # The first call waits for the router to be reachable, then for a worker to register.
        prompt = unique_prompt("first")
        call = stub.StreamComplete(
            request(prompt, max_new_tokens=5), timeout=NEW_REQUEST_DEADLINE_S, wait_for_ready=True
        )
        frames = list(call)
        assert "".join(frame.output_text for frame in frames) == " ".join([prompt] * 5)
        assert frames[-1].finished
        wait_until(lambda: len(set(registrations(new_router))) == 2, "both workers registered again")
        for outcome in run_streams(stub, [unique_prompt("after") for _ in range(4)], max_new_tokens=5):
            assert_complete(outcome)

    assert [worker.pid for worker in workers] == pids
    for worker in workers:
        assert worker.popen.poll() is None, f"{worker.name} exited:\n{worker.log()}"
        assert worker.log().count("registered with the router") == 2
    assert "dropped a chunk" not in new_router.log()  # the abandoned request's text went nowhere
