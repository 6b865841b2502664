"""Fault: the engine fails during a step (the paced engine's fail_marker injects an EngineError at
token 3). The request ends with an explicit error; the same worker process serves the next one.
Also the fault injection itself: the paced engine's echo, fail and hang markers, and their config.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest

from common.config import ConfigError, ModelConfig, PacedConfig, load_config
from protos import inference_pb2 as api
from tests.fault_clients import (
    LiveStream,
    Outcome,
    assert_complete,
    expected_text,
    registrations,
    request,
    run_streams,
    start_echo_pool,
    unique_prompt,
    worker_pid,
)
from tests.harness import inference_stub
from worker.core.paced import PacedEngine
from worker.core.request import ChatRequest, EngineError, Turn

INJECTED = "injected fault: engine error at token 3"


def assert_failed_in_band(outcome: Outcome, worker_id: str) -> None:
    """Two frames of text, then the error as the last frame, status OK (the README: text was sent)."""
    assert outcome.code == grpc.StatusCode.OK, outcome.describe()
    *text_frames, last = outcome.frames
    assert "".join(frame.output_text for frame in text_frames) == expected_text(outcome.prompt, 2)
    assert last.finished and last.finish_reason == api.ERROR, outcome.describe()
    assert INJECTED in last.output_text and last.token_usage == 2
    assert outcome.worker_ids == {worker_id}


def test_an_engine_error_ends_the_request_explicitly_and_the_worker_serves_the_next(procs, tmp_path):
    # Two tokens half a second apart, then the error: the router has relayed text long before it.
    pool = start_echo_pool(
        procs, tmp_path, workers={"devices": [0]}, fail_marker="BOOM", fault_at_token=3, tokens_per_second=2.0
    )
    stub = inference_stub(pool.channel)
    (worker_id,) = registrations(pool.supervisor)

    assert_failed_in_band(LiveStream(stub, "BOOM").result(), worker_id)
    after = LiveStream(stub, unique_prompt("next"), max_new_tokens=3).result()
    assert_complete(after)
    assert after.worker_ids == {worker_id}  # the one worker: the same process (its id ends with its pid)

    # Complete sends nothing before the end: an engine error is always a status there.
    with pytest.raises(grpc.RpcError) as caught:
        stub.Complete(request("BOOM again"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert INJECTED in caught.value.details()

    # A mix of failing and healthy requests: each ends on its own terms, the worker never restarts.
    prompts = [unique_prompt("BOOM") if index % 2 else unique_prompt("fine") for index in range(4)]
    for outcome in run_streams(stub, prompts, max_new_tokens=4):
        if "BOOM" in outcome.prompt:
            assert_failed_in_band(outcome, worker_id)
        else:
            assert_complete(outcome, finish=api.LENGTH)
    assert registrations(pool.supervisor) == [worker_id]
    assert [process.pid for process in pool.worker_processes()] == [worker_pid(worker_id)]


# ---- the fault injection itself (the paced engine's echo, fail_marker and hang_marker)


def paced(**settings: Any) -> PacedEngine:
    pace = PacedConfig(tokens_per_second=1000.0, first_token_delay_s=0.0, tokens_per_request=5, **settings)
    return PacedEngine(ModelConfig(name="paced-faults", engine="paced", paced=pace))


def chat(text: str) -> ChatRequest:
    return ChatRequest("system", (Turn(1, text),))


def test_echo_cycles_the_last_user_turns_words_and_falls_back_to_lorem_without_words():
    chunks = list(paced(echo=True).generate(chat("alpha  beta\n"), threading.Event()))
    assert "".join(chunk.text for chunk in chunks) == "alpha beta alpha beta alpha"
    silent = list(paced(echo=True).generate(chat(" \u3000"), threading.Event()))
    assert "".join(chunk.text for chunk in silent) == "lorem ipsum dolor sit amet"


def test_the_fail_marker_raises_an_engine_error_in_place_of_the_chosen_token():
    engine = paced(echo=True, fail_marker="BOOM", fault_at_token=3)
    stream = engine.generate(chat("say BOOM"), threading.Event())
    assert [next(stream).completion_tokens for _ in range(2)] == [1, 2]
    with pytest.raises(EngineError, match="injected fault: engine error at token 3"):
        next(stream)
    assert len(list(engine.generate(chat("no marker"), threading.Event()))) == 5


def test_the_hang_marker_blocks_for_good_even_when_cancelled():
    engine = paced(hang_marker="HANG", fault_at_token=2)
    cancel = threading.Event()
    first_token = threading.Event()

    def step() -> None:
        for _chunk in engine.generate(chat("HANG"), cancel):
            first_token.set()

    runner = threading.Thread(target=step, daemon=True)
    runner.start()
    assert first_token.wait(30)
    cancel.set()
    runner.join(0.5)
    assert runner.is_alive()  # stuck in the step after token 1, deaf to the cancel
    assert len(list(engine.generate(chat("fine"), threading.Event()))) == 5


@pytest.mark.parametrize(
    ("paced_yaml", "message"),
    [
        ("{fail_marker: ' '}", "model.paced.fail_marker: must not be empty (null = off), got ' '"),
        ("{hang_marker: ''}", "model.paced.hang_marker: must not be empty (null = off), got ''"),
        ("{fault_at_token: 0}", "model.paced.fault_at_token: must be >= 1, got 0"),
        ("{echo: 1}", "model.paced.echo: must be true or false, got 1"),
    ],
)
def test_fault_settings_are_validated(tmp_path, paced_yaml, message):
    path = tmp_path / "pool.yaml"
    path.write_text(f"model: {{engine: paced, paced: {paced_yaml}}}", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert str(caught.value) == message
