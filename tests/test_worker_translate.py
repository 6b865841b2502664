"""worker/translate.py: every field of a Generate reaches the engine's request, absent parameters stay
absent (= the configured default), and engine chunks go on the wire as the router expects them."""

from __future__ import annotations

import time

from protos import worker_pb2 as pb
from worker.core.request import ChatRequest, Chunk, FinishReason, SamplingParams, Turn
from worker.translate import cancelled_chunk, chat_request, error_chunk, wire_chunk


def generate(**params: object) -> pb.Generate:
    message = pb.Generate(request_id="r1", system_message="be brief", params=pb.SamplingParams(**params))
    message.history.add(role=1, content="你好")
    message.history.add(role=2, content="hello")
    message.history.add(role=1, content="more")
    return message


def test_every_parameter_of_a_generate_reaches_the_engine_request():
    every = generate(
        max_new_tokens=7,
        temperature=0.5,
        top_p=0.75,
        top_k=3,
        repetition_penalty=1.25,
        seed=2**64 - 1,
        stop=["。", "\n\n"],
    )
    assert chat_request(every) == ChatRequest(
        system_message="be brief",
        history=(Turn(role=1, content="你好"), Turn(role=2, content="hello"), Turn(role=1, content="more")),
        params=SamplingParams(
            max_new_tokens=7,
            temperature=0.5,
            top_p=0.75,
            top_k=3,
            repetition_penalty=1.25,
            seed=2**64 - 1,
            stop=("。", "\n\n"),
        ),
    )


def test_absent_parameters_stay_absent_and_zero_values_stay_set():
    assert chat_request(generate()).params == SamplingParams(
        max_new_tokens=None, temperature=None, top_p=None, top_k=None, repetition_penalty=None, seed=None
    )
    zeros = chat_request(generate(temperature=0.0, top_k=0, seed=0)).params
    assert (zeros.temperature, zeros.top_k, zeros.seed) == (0.0, 0, 0)


def test_engine_chunks_go_on_the_wire_with_their_finish_reason_and_a_time():
    before = time.time_ns()
    streaming = wire_chunk("r1", Chunk(text="Hi", completion_tokens=2, prompt_tokens=9))
    assert (streaming.request_id, streaming.text, streaming.completion_tokens) == ("r1", "Hi", 2)
    assert (streaming.prompt_tokens, streaming.finish_reason) == (9, pb.FINISH_NONE)
    assert before <= streaming.created_unix_nanos <= time.time_ns()
    expected = {FinishReason.STOP: pb.FINISH_STOP, FinishReason.LENGTH: pb.FINISH_LENGTH}
    expected[FinishReason.CANCELLED] = pb.FINISH_CANCELLED
    for reason, on_wire in expected.items():
        chunk = Chunk(text="", completion_tokens=3, prompt_tokens=9, finish_reason=reason)
        assert wire_chunk("r1", chunk).finish_reason == on_wire


def test_error_and_cancelled_chunks_are_final_and_keep_the_counts():
    before = time.time_ns()
    error = error_chunk("r1", pb.ERROR_ENGINE, "boom", completion_tokens=4, prompt_tokens=9)
    assert (error.request_id, error.finish_reason, error.error_kind) == (
        "r1",
        pb.FINISH_ERROR,
        pb.ERROR_ENGINE,
    )
    assert (error.error_message, error.completion_tokens, error.prompt_tokens, error.text) == (
        "boom",
        4,
        9,
        "",
    )
    assert before <= error.created_unix_nanos <= time.time_ns()
    bare = error_chunk("r2", pb.ERROR_INVALID_REQUEST, "bad")
    assert (bare.completion_tokens, bare.prompt_tokens, bare.error_kind) == (0, 0, pb.ERROR_INVALID_REQUEST)
    cancelled = cancelled_chunk("r1", completion_tokens=5, prompt_tokens=9)
    assert (cancelled.request_id, cancelled.finish_reason) == ("r1", pb.FINISH_CANCELLED)
    assert (cancelled.completion_tokens, cancelled.prompt_tokens, cancelled.error_kind) == (
        5,
        9,
        pb.ERROR_NONE,
    )
    assert before <= cancelled.created_unix_nanos <= time.time_ns()
