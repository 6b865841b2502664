"""The worker's request path in process (worker/service.py): a real WorkerService with the paced
engine, its generation thread and its real DEALER socket, against the test's ROUTER socket
(tests/worker_peer.py). The test plays the socket loop's part: it hands the service each message the
loop would read, so every step is deterministic, e.g. a chunk made while the worker is overdue
(frozen past the liveness window), which a process-level test can only reach by a race. (Fast
enough for mutation testing: scripts/mutate.py runs these against worker/service.py.)"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from common.config import ModelConfig, PacedConfig, PoolConfig, RouterConfig
from protos import worker_pb2 as pb
from tests.harness import WAIT_S, free_port, wait_until
from tests.worker_peer import WORKER_ID, RouterPeer, generate
from worker.core.paced import PacedEngine
from worker.service import EXIT_ENGINE_HUNG, WorkerIdentity, WorkerService

TOKENS = 6  # a paced answer's length
INTERVAL_MS = 1000  # x liveness 3: the worker holds back its chunks after 4 s without sending
SLOW = PacedConfig(tokens_per_second=10.0, first_token_delay_s=0.0, tokens_per_request=1000)


@dataclass
class Wired:
    peer: RouterPeer
    service: WorkerService

    def deliver_from_router(self, message: object) -> None:
        """What the socket loop does with a message it has read from the router."""
        self.peer.send(message)
        wait_until(self.service._router_message_waiting, "the message at the worker's socket")
        with self.service._lock:
            self.service._drain_router()

    def start(self, request_id: str, **params: object) -> None:
        self.marker()  # the heartbeat the loop would have sent: the worker is not overdue
        self.until_marker()
        self.deliver_from_router(generate(request_id, "hello there", **params))

    def marker(self) -> None:
        """A heartbeat sent now: everything the worker sent before it reaches the peer first."""
        with self.service._lock:
            self.service._send(pb.Heartbeat(busy_request_id="marker"))

    def until_marker(self) -> list[tuple[str, object]]:
        """Messages from the worker up to the marker (not included)."""
        received = []
        while (got := self.peer.receive())[0] != "heartbeat" or got[1].busy_request_id != "marker":
            received.append(got)
        return received

    def slow_down(self) -> None:
        """Long answers at 10 tokens/s from now on: a request is still running when the next step comes."""
        self.service._engine._pace = SLOW

    def wait_idle(self) -> None:
        wait_until(lambda: self.service._current is None, "the generation over")


@pytest.fixture
def wired() -> Iterator[Wired]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pace = PacedConfig(tokens_per_second=200.0, first_token_delay_s=0.0, tokens_per_request=TOKENS)
    model = ModelConfig(name="paced-test", engine="paced", context_size=512, paced=pace)
    config = PoolConfig(router=RouterConfig(zmq_bind=endpoint), model=model)
    peer = RouterPeer(endpoint)
    try:
        service = WorkerService(PacedEngine(model), WorkerIdentity(WORKER_ID, (0,)), endpoint, config)
        try:
            service._generation.start()
            with service._lock:
                service._send_hello(time.monotonic())
            assert peer.expect("hello").worker_id == WORKER_ID
            wired = Wired(peer, service)
            wired.deliver_from_router(pb.Welcome(heartbeat_interval_ms=INTERVAL_MS, liveness=3))
            assert service._registered
            yield wired
        finally:
            service._close()
    finally:
        peer.close()


def chunks_of(received: list[tuple[str, object]]) -> list[pb.Chunk]:
    return [message for kind, message in received if kind == "chunk"]


def test_a_generate_is_answered_with_its_chunks_then_one_final_chunk(wired):
    wired.start("r1", max_new_tokens=4)
    chunks = wired.peer.chunks_until_final("r1")
    assert [chunk.completion_tokens for chunk in chunks] == [1, 2, 3, 4]
    assert chunks[-1].finish_reason == pb.FINISH_LENGTH
    assert all(chunk.finish_reason == pb.FINISH_NONE for chunk in chunks[:-1])
    wired.wait_idle()
    wired.start("r2")  # free again: the next request runs
    assert wired.peer.chunks_until_final("r2")[-1].completion_tokens == TOKENS


def test_a_generate_while_busy_is_refused_with_an_error_naming_the_busy_request(wired, caplog):
    caplog.set_level(logging.INFO, logger="worker")
    wired.slow_down()
    wired.start("long")
    assert wired.peer.expect("chunk").request_id == "long"
    wired.deliver_from_router(generate("second"))
    refusal = wired.peer.expect("chunk")
    while refusal.request_id == "long":
        refusal = wired.peer.expect("chunk")
    assert refusal.request_id == "second"
    assert (refusal.finish_reason, refusal.error_kind) == (pb.FINISH_ERROR, pb.ERROR_ENGINE)
    assert refusal.error_message == f"worker {WORKER_ID} is busy with request long"
    assert wired.service._current.request_id == "long"
    assert "request second: refused, busy with request long" in worker_log(caplog)


def test_a_generate_without_a_request_id_is_dropped(wired):
    wired.deliver_from_router(generate(""))
    assert wired.service._current is None
    wired.marker()
    assert wired.until_marker() == []


def test_a_cancel_stops_the_current_request_and_a_cancel_for_another_is_ignored(wired):
    wired.start("r1", max_new_tokens=1)  # short: the cancel of another request must not stop it
    wired.deliver_from_router(pb.Cancel(request_id="not-running"))
    assert wired.peer.chunks_until_final("r1")[-1].finish_reason == pb.FINISH_LENGTH
    wired.wait_idle()

    wired.slow_down()  # the cancel lands mid-answer
    wired.start("r2")
    assert wired.peer.expect("chunk").request_id == "r2"
    wired.deliver_from_router(pb.Cancel(request_id="r2"))
    final = wired.peer.chunks_until_final("r2")[-1]
    assert final.finish_reason == pb.FINISH_CANCELLED and final.completion_tokens < 100


def test_a_worker_silent_past_the_liveness_window_sends_none_of_its_overdue_chunks(wired):
    """A thawed worker: whatever the generation thread makes before the loop re-registers stays here."""
    wired.slow_down()
    wired.start("frozen")
    assert wired.peer.expect("chunk").completion_tokens == 1
    with wired.service._lock:  # as if frozen: nothing sent for far longer than the router waits
        wired.service._last_sent = time.monotonic() - 1000 * WAIT_S
    wait_until(lambda: wired.service._current.completion_tokens >= 3, "two more tokens made")
    wired.marker()
    assert chunks_of(wired.until_marker()) == [], "an overdue chunk went out"


def test_chunks_of_an_abandoned_generation_are_not_sent_and_it_ends(wired):
    wired.slow_down()
    wired.start("abandoned")
    assert wired.peer.expect("chunk").request_id == "abandoned"
    with wired.service._lock:  # what was sent before the abandon comes before this marker
        wired.service._send(pb.Heartbeat(busy_request_id="marker"))
        wired.service._abandon("the router disconnected this worker")
    wired.until_marker()
    wired.wait_idle()  # the abandon cancels the engine: the generation ends within a token
    wired.marker()
    assert chunks_of(wired.until_marker()) == [], "a chunk of the abandoned generation went out"


def worker_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "worker"]


def test_what_the_worker_does_with_each_message_is_logged_with_the_request_id(wired, caplog):
    caplog.set_level(logging.INFO, logger="worker")
    wired.slow_down()
    wired.deliver_from_router(generate(""))
    wired.start("r1")
    wired.deliver_from_router(pb.Cancel(request_id="elsewhere"))
    wired.deliver_from_router(pb.Heartbeat())
    wired.deliver_from_router(pb.Hello(worker_id="confused router"))
    wired.deliver_from_router(pb.Cancel(request_id="r1"))
    wired.wait_idle()
    wired.service._deliver(pb.Chunk(request_id="ghost", text="boo", completion_tokens=1))  # a bug's chunk
    wired.marker()
    assert "ghost" not in [getattr(message, "request_id", "") for _, message in wired.until_marker()]
    assert worker_log(caplog)[-1] == "request ghost: chunk from the generation thread for no current request"
    assert worker_log(caplog)[:5] == [
        "dropped a Generate without a request id",
        "request r1: started (1 turns)",
        "request elsewhere: cancel for a request not running here, ignored",
        "dropped an unexpected hello message from the router",
        "request r1: cancel received",
    ]


def test_a_disconnect_abandons_the_request_and_registers_again(wired, caplog):
    caplog.set_level(logging.INFO, logger="worker")
    wired.slow_down()
    wired.start("r1")
    assert wired.peer.expect("chunk").request_id == "r1"
    wired.deliver_from_router(pb.Disconnect(reason=""))
    assert not wired.service._registered
    assert wired.service._current is None or wired.service._current.abandoned
    assert "the router disconnected this worker (no reason given); registering again" in worker_log(caplog)
    assert "request r1: abandoned (the router disconnected this worker)" in worker_log(caplog)
    wired.wait_idle()
    with wired.service._lock:  # the loop's next tick: a Hello at once (the abandoned request is over)
        wired.service._on_clock(time.monotonic())
    assert wired.peer.expect("hello", skip=("heartbeat", "chunk")).worker_id == WORKER_ID


def test_a_request_waiting_for_its_first_token_has_a_step_deadline_and_an_idle_disconnect_is_harmless(wired):
    wired.service._engine._pace = PacedConfig(
        tokens_per_second=10.0, first_token_delay_s=1.0, tokens_per_request=3
    )
    wired.start("r1")
    with wired.service._lock:  # the loop's view before any token: the engine watchdog's deadline is set
        assert wired.service._next_deadline() <= time.monotonic() + INTERVAL_MS / 1000
        wired.service._on_clock(time.monotonic())
    assert wired.peer.chunks_until_final("r1")[-1].completion_tokens == 3
    wired.wait_idle()
    wired.deliver_from_router(pb.Disconnect(reason="bye"))  # nothing to abandon
    assert not wired.service._registered and wired.service._current is None


def test_retire_is_obeyed_and_logged_with_its_reason(wired, caplog):
    caplog.set_level(logging.INFO, logger="worker")
    wired.deliver_from_router(pb.Retire(reason=""))
    assert wired.service._retiring
    assert worker_log(caplog) == [
        "told to retire (no reason given): leaving once the current request (if any) is done"
    ]


def test_a_raw_prompt_request_is_logged_as_one(wired, caplog):
    caplog.set_level(logging.INFO, logger="worker")
    wired.deliver_from_router(pb.Generate(request_id="raw", raw_prompt="Once upon a time"))
    assert wired.peer.chunks_until_final("raw")[-1].completion_tokens == TOKENS
    assert worker_log(caplog)[0] == "request raw: started (raw prompt)"


def test_the_completion_log_times_the_first_token_only_when_one_came(wired, caplog):
    caplog.set_level(logging.INFO, logger="worker")
    wired.start("answered", max_new_tokens=4)
    wired.peer.chunks_until_final("answered")
    wired.wait_idle()
    wired.service._engine._pace = PacedConfig(
        tokens_per_second=200.0, first_token_delay_s=0.0, fail_marker="FAIL", fault_at_token=1
    )
    wired.deliver_from_router(generate("failed", "FAIL at once"))
    assert wired.peer.chunks_until_final("failed")[-1].error_kind == pb.ERROR_ENGINE
    wired.wait_idle()

    done = [line for line in worker_log(caplog) if ": done, " in line]
    assert re.match(
        r"request answered: done, length; prompt \d+ tokens, 4 tokens, first token after \d+\.\d{3} s, ",
        done[0],
    )
    assert re.match(
        r"request failed: done, error \(engine: injected fault.*\); prompt \d+ tokens, 0 tokens, "
        r"first token after -, 0\.0 tokens/s, ",
        done[1],
    )


def test_the_engine_watchdog_counts_from_the_last_chunk_and_a_hung_engine_reports_its_counts(wired):
    """The loop's clock is driven by hand: each tick is placed against the pace's lower bounds, so a
    busy machine (later tokens) only widens the margins."""
    wired.service._settings = replace(wired.service._settings, step_timeout_s=1.5)
    wired.service._engine._pace = PacedConfig(
        tokens_per_second=10.0, first_token_delay_s=1.0, tokens_per_request=1000
    )
    started = time.monotonic()
    wired.start("r1")
    first = wired.peer.expect("chunk")
    assert (first.request_id, first.completion_tokens) == ("r1", 1)
    with wired.service._lock:  # 2 s after the start, but under 1.5 s after the first chunk (>= 1 s in)
        wired.service._on_clock(started + 2.0)
    assert wired.service._exit_code is None and wired.service._current.request_id == "r1"

    with wired.service._lock:  # far past the last chunk: the engine is hung
        wired.service._on_clock(time.monotonic() + 10.0)
        made = wired.service._current.completion_tokens
    assert wired.service._exit_code == EXIT_ENGINE_HUNG
    final = wired.peer.chunks_until_final("r1")[-1]
    assert (final.finish_reason, final.error_kind) == (pb.FINISH_ERROR, pb.ERROR_ENGINE)
    assert (
        final.error_message
        == "the engine step did not finish within 1.5 s (step_timeout_s); worker restarting"
    )
    assert (final.completion_tokens, final.prompt_tokens) == (made, first.prompt_tokens)
    assert first.prompt_tokens > 0
    assert wired.peer.expect("disconnect", skip=("chunk", "heartbeat")).reason == "engine hung"
