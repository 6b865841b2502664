"""Fault: a hung worker, either the whole process frozen (SIGSTOP) or an engine step that never
returns (the paced engine's hang_marker). Real pool processes on loopback.
"""

from __future__ import annotations

import os
import re
import signal
import time

import grpc

from protos import inference_pb2 as api
from protos import worker_pb2 as pb
from tests.fault_clients import (
    LiveStream,
    assert_complete,
    assert_failed,
    expected_text,
    registrations,
    request,
    run_streams,
    start_echo_pool,
    unique_prompt,
    worker_pid,
)
from tests.harness import inference_stub, wait_until, write_config
from tests.worker_peer import HELLO_TIMEOUT_S, connected, generate
from worker.service import EXIT_ENGINE_HUNG

PACE = {"tokens_per_second": 20.0, "tokens_per_request": 200}  # a long answer: 10 s
SHORT = {"max_new_tokens": 6}


def test_a_stopped_worker_is_dropped_gets_no_work_and_rejoins_cleanly_after_sigcont(procs, tmp_path):
    pool = start_echo_pool(procs, tmp_path, router={"liveness": 5}, **PACE)
    supervisor = pool.supervisor
    stub = inference_stub(pool.channel)
    worker_ids = set(registrations(supervisor))

    started = LiveStream(stub, unique_prompt("frozen"))
    frozen = started.wait_frames(2)[0].worker_id
    (healthy,) = worker_ids - {frozen}
    os.kill(worker_pid(frozen), signal.SIGSTOP)
    try:
        assert_failed(
            started.result(), grpc.StatusCode.UNAVAILABLE, f"worker {frozen} was lost", "no message for"
        )
        for outcome in run_streams(stub, [unique_prompt("meanwhile") for _ in range(4)], **SHORT):
            assert_complete(outcome)
            assert outcome.worker_ids == {healthy}  # no work for the frozen worker
    finally:
        os.kill(worker_pid(frozen), signal.SIGCONT)

    # It wakes up with the frozen request's tokens overdue: they must reach nobody. It registers
    # again under the same id, so the same process (the id ends with its pid): no restart.
    supervisor.wait_for_log(rf"worker {frozen}: request \w+: abandoned")
    wait_until(lambda: registrations(supervisor).count(frozen) == 2, f"{frozen} registered again")
    log = supervisor.log()
    assert "restarting" not in log
    # It knew it had been silent too long and registered again: by its own clock, or by the router's
    # Disconnect when the SIGSTOP landed between the loop's own silence check and its read of the
    # socket (both seen on a busy machine). That it withholds its overdue chunks meanwhile is pinned
    # in process (test_worker_request_path.py): here a chunk already handed to ZeroMQ when the SIGSTOP
    # landed may still arrive after the thaw (seen on a busy machine): the router then answers the
    # unregistered peer with a Disconnect and relays nothing (test_worker_registry.py); the frozen
    # stream had already ended with UNAVAILABLE above.
    noticed = r"this worker sent nothing for [\d.]+ s|the router disconnected this worker"
    assert re.search(rf"worker {frozen}: ({noticed})", log), log
    # The healthy worker, idle the longest, takes a long request: the woken one serves the rest.
    hold = LiveStream(stub, unique_prompt("hold"))
    assert hold.wait_frames(1)[0].worker_id == healthy
    for outcome in run_streams(stub, [unique_prompt("after") for _ in range(4)], **SHORT):
        assert_complete(outcome)
        assert outcome.worker_ids == {frozen}
    hold.cancel()


def test_a_freeze_shorter_than_the_liveness_window_goes_unnoticed(procs, tmp_path):
    # A 6 s window (12 x 0.5 s) and a 1 s freeze: room for a busy machine on either side.
    router = {"heartbeat_interval_s": 0.5, "liveness": 12}
    pool = start_echo_pool(
        procs,
        tmp_path,
        router=router,
        workers={"devices": [0]},
        tokens_per_second=10.0,
        tokens_per_request=30,
    )
    stub = inference_stub(pool.channel)
    (worker_id,) = registrations(pool.supervisor)
    prompt = unique_prompt("paused")
    paused = LiveStream(stub, prompt)
    paused.wait_frames(2)
    os.kill(worker_pid(worker_id), signal.SIGSTOP)
    try:
        time.sleep(1.0)  # the freeze itself (no assertion depends on this time)
    finally:
        os.kill(worker_pid(worker_id), signal.SIGCONT)
    outcome = paused.result()
    assert_complete(outcome)
    assert outcome.text == expected_text(prompt, 30) and outcome.worker_ids == {worker_id}
    assert_complete(LiveStream(stub, unique_prompt("after"), **SHORT).result())
    log = pool.supervisor.log()
    assert registrations(pool.supervisor) == [worker_id], "the worker registered again"
    for sign_of_a_loss in ("was lost", "abandoned", "sent nothing for", "reconnecting", "restarting"):
        assert sign_of_a_loss not in log, sign_of_a_loss


def test_a_request_sent_to_a_stopped_idle_worker_runs_again_once_the_worker_is_found_silent(procs, tmp_path):
    pool = start_echo_pool(procs, tmp_path, router={"liveness": 5}, **PACE)
    stub = inference_stub(pool.channel)
    busy = LiveStream(stub, unique_prompt("busy"))
    busy_worker = busy.wait_frames(1)[0].worker_id
    (idle,) = set(registrations(pool.supervisor)) - {busy_worker}
    os.kill(worker_pid(idle), signal.SIGSTOP)
    try:
        unlucky = LiveStream(stub, unique_prompt("unlucky"), **SHORT)  # to the only idle worker
        pool.supervisor.wait_for_log(rf"request \w+ will run again: worker {idle} was lost \(no message for")
    finally:
        os.kill(worker_pid(idle), signal.SIGCONT)
    assert_complete(unlucky.result())  # on the woken worker once it re-registered: the other is busy
    busy.cancel()


def test_an_engine_step_that_never_returns_fails_its_request_and_the_worker_is_restarted(procs, tmp_path):
    pool = start_echo_pool(
        procs, tmp_path, workers={"step_timeout_s": 1.0}, hang_marker="HANG", fault_at_token=3, **PACE
    )
    stub = inference_stub(pool.channel)
    hung = LiveStream(stub, "HANG")
    hung.wait_frames(1)
    meanwhile = run_streams(stub, [unique_prompt("meanwhile") for _ in range(3)], **SHORT)
    outcome = hung.result()
    hung_worker = outcome.frames[0].worker_id

    # Two tokens, then the watchdog: an in-band error frame naming the cause, status OK.
    assert outcome.code == grpc.StatusCode.OK, outcome.describe()
    *text_frames, last = outcome.frames
    assert "".join(frame.output_text for frame in text_frames) == "HANG HANG"
    assert last.finished and last.finish_reason == api.ERROR
    assert "the engine step did not finish within 1 s (step_timeout_s)" in last.output_text
    for other in meanwhile:
        assert_complete(other)
        assert hung_worker not in other.worker_ids
    pool.supervisor.wait_for_log(
        rf"worker dev\d-w0 \(pid {worker_pid(hung_worker)}\) exited with code {EXIT_ENGINE_HUNG}.*restarting"
    )

    # Complete() of a hung request: it has sent nothing, so the error is a status.
    try:
        stub.Complete(request("HANG"), timeout=60)
        raise AssertionError("Complete of a hung request succeeded")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "did not finish within 1 s" in error.details()
    for outcome in run_streams(stub, [unique_prompt("after") for _ in range(4)], **SHORT):
        assert_complete(outcome)


def test_a_burst_of_stale_disconnects_around_a_hello_makes_no_second_registration(procs, tmp_path):
    """After a freeze, the router answers each overdue message of the worker with a Disconnect, and
    those can reach the worker after its new Hello. The first reads as a refusal (retry after the
    backoff); the rest must not add Hellos, each of which would make the router drop and register
    the worker again, failing whatever it had just been given."""
    config = write_config(tmp_path, {"workers": {"reconnect_backoff_s": 2.0, "reconnect_backoff_max_s": 2.0}})
    with connected(procs, config) as (peer, worker):
        peer.expect("hello", HELLO_TIMEOUT_S)
        for _ in range(3):
            peer.send(pb.Disconnect(reason="not registered: send a hello"))
        wait_until(lambda: worker.log().count("(not registered: send a hello)") == 3, "the Disconnects read")
        peer.send(pb.Welcome(heartbeat_interval_ms=100, liveness=3))  # the answer to the one Hello
        peer.keepalive = True
        peer.send(generate("first", max_new_tokens=3))
        received = [peer.receive() for _ in range(12)]  # the chunks and heartbeats of about a second
        assert "hello" not in [kind for kind, _ in received]
        assert worker.log().count("registered with the router") == 1
        assert "a Disconnect while a Hello is due (not registered: send a hello), ignored" in worker.log()
