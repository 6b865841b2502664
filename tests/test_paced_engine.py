"""The paced load-testing engine, driven directly through the Engine contract."""

from __future__ import annotations

import threading

import pytest

from common.config import ModelConfig, PacedConfig
from worker.core.paced import PacedEngine, estimate_prompt_tokens
from worker.core.request import ChatRequest, FinishReason, RequestError, SamplingParams, Turn

FAST = PacedConfig(tokens_per_second=1000.0, first_token_delay_s=0.0, tokens_per_request=5)


def engine(paced: PacedConfig = FAST, context_size: int = 512) -> PacedEngine:
    return PacedEngine(ModelConfig(name="paced-unit", engine="paced", context_size=context_size, paced=paced))


def request(text: str = "hi", **params: int) -> ChatRequest:
    return ChatRequest("system", (Turn(1, text),), SamplingParams(**params))


def test_streams_the_configured_number_of_words_then_stops():
    chunks = list(engine().generate(request(), threading.Event()))
    assert [c.completion_tokens for c in chunks] == [1, 2, 3, 4, 5]
    assert [c.finish_reason for c in chunks] == [None] * 4 + [FinishReason.STOP]
    assert "".join(c.text for c in chunks) == "lorem ipsum dolor sit amet"
    assert {c.prompt_tokens for c in chunks} == {estimate_prompt_tokens(request())}
    assert engine().model_id == "paced-unit" and engine().context_size == 512


def test_max_new_tokens_cuts_the_answer_with_length():
    chunks = list(engine().generate(request(max_new_tokens=2), threading.Event()))
    assert [c.completion_tokens for c in chunks] == [1, 2]
    assert chunks[-1].finish_reason == FinishReason.LENGTH


def test_the_context_limits_the_answer():
    prompt = request("x" * 80)
    room = 32 - estimate_prompt_tokens(prompt)
    assert 0 < room < 5
    chunks = list(engine(context_size=32).generate(prompt, threading.Event()))
    assert len(chunks) == room and chunks[-1].finish_reason == FinishReason.LENGTH


def test_a_prompt_filling_the_context_is_refused_before_any_chunk():
    with pytest.raises(RequestError, match="leaves no room in the context of 16 tokens"):
        engine(context_size=16).generate(request("word " * 100), threading.Event())


def test_cancel_interrupts_the_wait_at_once():
    slow = engine(PacedConfig(tokens_per_second=1.0, first_token_delay_s=3600.0, tokens_per_request=5))
    cancel = threading.Event()
    chunks = []
    runner = threading.Thread(target=lambda: chunks.extend(slow.generate(request(), cancel)))
    runner.start()
    cancel.set()
    runner.join(timeout=30)  # the first token is an hour away: only the cancel can end it
    assert not runner.is_alive()
    assert [(c.completion_tokens, c.finish_reason) for c in chunks] == [(0, FinishReason.CANCELLED)]


def test_cancel_between_tokens_ends_with_cancelled_after_the_tokens_so_far():
    paced = engine(PacedConfig(tokens_per_second=0.001, first_token_delay_s=0.0, tokens_per_request=5))
    cancel = threading.Event()
    stream = paced.generate(request(), cancel)
    first = next(stream)
    assert first.completion_tokens == 1 and first.finish_reason is None
    cancel.set()  # the next token is 1000 s away
    (last,) = list(stream)
    assert (last.completion_tokens, last.finish_reason) == (1, FinishReason.CANCELLED)


def test_rate_zero_streams_every_token_without_waiting_and_still_honours_cancel():
    flat_out = engine(PacedConfig(tokens_per_second=0.0, first_token_delay_s=0.0, tokens_per_request=50))
    chunks = list(flat_out.generate(request(), threading.Event()))
    assert [c.completion_tokens for c in chunks] == list(range(1, 51))
    assert chunks[-1].finish_reason == FinishReason.STOP

    cancel = threading.Event()
    stream = flat_out.generate(request(), cancel)
    assert next(stream).completion_tokens == 1
    cancel.set()
    (last,) = list(stream)
    assert (last.completion_tokens, last.finish_reason) == (1, FinishReason.CANCELLED)
