"""The worker process against a test-side ZeroMQ ROUTER: real sockets, a real `python -m worker`
subprocess with the paced engine, the wire protocol of protos/worker.proto."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from common import wire
from protos import worker_pb2 as pb
from tests.harness import ConfigFile, ProcessSet, start_worker, write_config
from tests.worker_peer import HELLO_TIMEOUT_S, WORKER_ID, connected, generate
from worker.affinity import core_share
from worker.service import EXIT_ENGINE_HUNG


def paced_config(tmp_path: Path, **paced: Any) -> ConfigFile:
    settings = {"tokens_per_second": 50.0, "first_token_delay_s": 0.0, "tokens_per_request": 8, **paced}
    return write_config(tmp_path, {"model": {"paced": settings}})


@pytest.fixture
def peer_and_worker(procs: ProcessSet, tmp_path: Path):
    with connected(procs, paced_config(tmp_path)) as (peer, worker):
        yield peer, worker


def test_hello_welcome_and_heartbeats(procs, tmp_path):
    with connected(procs, paced_config(tmp_path), dev_id=3) as (peer, worker):
        hello = peer.register()
        assert hello.protocol_version == wire.PROTOCOL_VERSION
        assert hello.worker_id == WORKER_ID
        assert hello.device_id == 3
        assert hello.model_id == "paced-test"
        assert hello.context_size == 512
        assert hello.pid == worker.pid
        assert hello.restarts == 0
        assert peer.expect("heartbeat", skip=()).busy_request_id == ""
        assert peer.expect("heartbeat", skip=()).busy_request_id == ""


def test_a_restarted_worker_says_so_until_its_first_welcome_only(procs, tmp_path):
    with connected(procs, paced_config(tmp_path), 0, "--restarts", "3") as (peer, _):
        assert peer.expect("hello", HELLO_TIMEOUT_S).restarts == 3  # unanswered: said again
        assert peer.register().restarts == 3
        peer.send(pb.Disconnect(reason="router restarted"))
        assert peer.expect("hello", timeout=5.0, skip=("heartbeat",)).restarts == 0


def test_generate_streams_chunks_then_one_final_chunk(peer_and_worker):
    peer, worker = peer_and_worker
    peer.register()
    peer.send(generate("r1"))
    chunks = peer.chunks_until_final("r1")
    assert [c.completion_tokens for c in chunks] == list(range(1, 9))
    assert [c.finish_reason for c in chunks] == [pb.FINISH_NONE] * 7 + [pb.FINISH_STOP]
    assert "".join(c.text for c in chunks).startswith("lorem ipsum dolor")
    assert all(c.prompt_tokens > 0 and c.created_unix_nanos > 0 for c in chunks)
    assert chunks[-1].error_kind == pb.ERROR_NONE
    assert peer.expect("heartbeat", skip=()).busy_request_id == ""
    worker.wait_for_log(r"request r1: done, stop; prompt \d+ tokens, 8 tokens, first token after")

    peer.send(generate("r2", max_new_tokens=3))
    chunks = peer.chunks_until_final("r2")
    assert [c.completion_tokens for c in chunks] == [1, 2, 3]
    assert chunks[-1].finish_reason == pb.FINISH_LENGTH


def test_heartbeat_names_the_busy_request(procs, tmp_path):
    config = paced_config(tmp_path, tokens_per_second=5.0, tokens_per_request=100)
    with connected(procs, config) as (peer, _worker):
        peer.register(keepalive=True)
        peer.send(generate("busy-1"))
        # A heartbeat already on its way when the Generate arrived may still say idle; once a chunk
        # has come, the worker is busy for the 20 s the answer takes.
        peer.expect("chunk")
        assert peer.expect("heartbeat", skip=("chunk",)).busy_request_id == "busy-1"


def test_cancel_stops_within_one_token_and_the_worker_serves_the_next_request(procs, tmp_path):
    config = paced_config(tmp_path, tokens_per_second=4.0, tokens_per_request=100)
    with connected(procs, config) as (peer, worker):
        peer.register(keepalive=True)
        peer.send(generate("c1"))
        assert peer.expect("chunk").completion_tokens == 1
        peer.send(pb.Cancel(request_id="c1"))
        after_cancel = peer.chunks_until_final("c1")
        assert len(after_cancel) <= 2, "more than one token after the cancel"
        assert after_cancel[-1].finish_reason == pb.FINISH_CANCELLED
        worker.wait_for_log(r"request c1: done, cancelled")

        peer.assert_serves_a_short_request("c2")


def test_generate_while_busy_is_refused_and_the_running_request_goes_on(procs, tmp_path):
    config = paced_config(tmp_path, tokens_per_second=20.0, tokens_per_request=6)
    with connected(procs, config) as (peer, _worker):
        peer.register(keepalive=True)
        peer.send(generate("first"))
        peer.send(generate("second"))
        chunks = []
        refusal = None
        while not chunks or chunks[-1].finish_reason == pb.FINISH_NONE:
            chunk = peer.expect("chunk")
            if chunk.request_id == "second":
                refusal = chunk
            else:
                chunks.append(chunk)
        assert refusal is not None
        assert refusal.finish_reason == pb.FINISH_ERROR
        assert refusal.error_kind == pb.ERROR_ENGINE
        assert "busy with request first" in refusal.error_message
        assert chunks[-1].finish_reason == pb.FINISH_STOP
        assert chunks[-1].completion_tokens == 6


def test_request_error_becomes_an_invalid_request_chunk(procs, tmp_path):
    config = write_config(tmp_path, {"model": {"context_size": 16}})
    with connected(procs, config) as (peer, _worker):
        peer.register()
        peer.send(generate("too-long", text="word " * 200))
        (final,) = peer.chunks_until_final("too-long")
        assert final.finish_reason == pb.FINISH_ERROR
        assert final.error_kind == pb.ERROR_INVALID_REQUEST
        assert "context of 16 tokens" in final.error_message
        peer.assert_serves_a_short_request("short", text="hi", tokens=1)


def test_silent_router_makes_the_worker_reconnect_and_register_again(procs, tmp_path):
    config = paced_config(tmp_path, tokens_per_second=5.0, tokens_per_request=100)
    with connected(procs, config) as (peer, worker):
        peer.register(interval_ms=100, liveness=3)
        peer.send(generate("lost"))
        second_hello = peer.expect("hello", skip=("heartbeat", "chunk"))
        assert second_hello.worker_id == WORKER_ID
        worker.wait_for_log(r"router silent for .* reconnecting")
        worker.wait_for_log(r"request lost: abandoned")
        peer.send(pb.Welcome(heartbeat_interval_ms=100, liveness=3))
        peer.keepalive = True
        peer.assert_serves_a_short_request("after")


def test_disconnect_from_the_router_abandons_the_request_and_registers_again_at_once(procs, tmp_path):
    config = paced_config(tmp_path, tokens_per_second=5.0, tokens_per_request=100)
    with connected(procs, config) as (peer, worker):
        peer.register(interval_ms=5000, liveness=3)  # silence detection far away: only Disconnect acts
        peer.send(generate("dropped"))
        assert peer.expect("chunk").request_id == "dropped"
        peer.send(pb.Disconnect(reason="router restarted"))
        peer.expect("hello", timeout=5.0, skip=("heartbeat", "chunk"))
        worker.wait_for_log(r"request dropped: abandoned")
        peer.send(pb.Welcome(heartbeat_interval_ms=5000, liveness=3))
        peer.assert_serves_a_short_request("next")


def test_a_hello_answered_with_disconnect_is_retried_with_backoff(procs, tmp_path):
    with connected(procs, paced_config(tmp_path)) as (peer, worker):
        peer.expect("hello", HELLO_TIMEOUT_S)
        peer.send(pb.Disconnect(reason="protocol version 1 not supported"))
        peer.expect("hello")
        worker.wait_for_log(
            r"a Disconnect while waiting for the Welcome \(protocol version 1 not supported\); "
            r"a new Hello in 0.05 s"
        )
        peer.send(pb.Disconnect(reason="still not"))
        peer.expect("hello")
        worker.wait_for_log(r"\(still not\); a new Hello in 0.10 s")  # doubled: no tight Hello loop


def test_bad_frames_from_the_router_are_dropped(peer_and_worker):
    peer, worker = peer_and_worker
    peer.register()
    peer.send_raw(b"\xff\x00garbage")
    peer.send_raw(b"", wire.pack(pb.Heartbeat()))  # two frames: not the protocol
    peer.send(pb.Hello(worker_id="not for a worker"))
    peer.assert_serves_a_short_request("fine")
    log = worker.log()
    assert "dropped a bad frame" in log
    assert "dropped a message of 2 frames" in log
    assert "dropped an unexpected hello" in log


def test_sigterm_when_idle_sends_disconnect_and_exits_zero(peer_and_worker):
    peer, worker = peer_and_worker
    peer.register()
    peer.expect("heartbeat", skip=())
    worker.signal(signal.SIGTERM)
    assert peer.expect("disconnect").reason == "worker stopping"
    assert worker.wait() == 0


def test_sigterm_lets_the_current_request_finish_first(procs, tmp_path):
    config = paced_config(tmp_path, tokens_per_second=10.0, tokens_per_request=10)
    with connected(procs, config) as (peer, worker):
        peer.register(interval_ms=100, keepalive=True)
        peer.send(generate("last"))
        assert peer.expect("chunk").completion_tokens == 1
        worker.signal(signal.SIGTERM)
        received = []
        while not received or received[-1][0] != "disconnect":
            received.append(peer.receive())
        chunks = [message for kind, message in received if kind == "chunk"]
        assert chunks[-1].finish_reason == pb.FINISH_STOP
        assert chunks[-1].completion_tokens == 10
        # Past the second chunk after the signal, the worker had surely handled it: still heartbeating?
        second_chunk = [index for index, (kind, _) in enumerate(received) if kind == "chunk"][1]
        later = received[second_chunk:]
        assert ("heartbeat", pb.Heartbeat(busy_request_id="last")) in later, "no heartbeat while finishing"
        assert received[-1][1].reason == "worker stopping"
        assert worker.wait() == 0


def test_a_hung_engine_step_fails_the_request_and_the_worker_exits(procs, tmp_path):
    config = write_config(
        tmp_path, {"model": {"paced": {"first_token_delay_s": 60.0}}, "workers": {"step_timeout_s": 0.5}}
    )
    with connected(procs, config) as (peer, worker):
        peer.register(keepalive=True)
        peer.send(generate("stuck"))
        (final,) = peer.chunks_until_final("stuck")
        assert final.finish_reason == pb.FINISH_ERROR
        assert final.error_kind == pb.ERROR_ENGINE
        assert "did not finish within" in final.error_message
        assert peer.expect("disconnect").reason == "engine hung"
        assert worker.wait() == EXIT_ENGINE_HUNG


def test_an_engine_that_cannot_load_exits_with_a_message(procs, tmp_path):
    config = write_config(tmp_path, {"model": {"engine": "numpy", "path": str(tmp_path / "missing.gguf")}})
    worker = start_worker(procs, config, dev_id=1)
    assert worker.wait() == 1
    assert f"pinned to cores {core_share(1, 1, os.sched_getaffinity(0))}" in worker.log()  # numpy: its share
    assert "cannot load the numpy engine" in worker.log()
    assert "missing.gguf" in worker.log()


def test_a_bad_config_exits_naming_the_key(procs, tmp_path):
    config = write_config(tmp_path, {"model": {"engine": "gpu"}})
    worker = start_worker(procs, config)
    assert worker.wait() == 2
    assert "model.engine: must be one of numpy, sail, paced, got 'gpu'" in worker.log()
