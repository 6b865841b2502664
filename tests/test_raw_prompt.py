"""A raw prompt (Generate.raw_prompt, the HTTP front's /v1/completions) through the worker: the wire
conversion, and the engine continuing the text as it is, without the chat template."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from common.config import GenerationDefaults
from protos import worker_pb2
from tests.probe_graphs import ProbeGraphs
from worker.core.checkpoint import load_hf_checkpoint
from worker.core.driver import Generation
from worker.core.llm_engine import LLMEngine
from worker.core.numpy_graphs import NumpyGraphs
from worker.core.request import ChatRequest, RequestError, SamplingParams
from worker.translate import chat_request

TEXT = "Once upon a time there was a cat"
GREEDY = GenerationDefaults(temperature=0.0, repetition_penalty=1.0)


def test_the_wire_carries_a_raw_prompt_apart_from_a_conversation() -> None:
    raw = chat_request(worker_pb2.Generate(request_id="r", raw_prompt=TEXT))
    assert raw.raw_prompt == TEXT and raw.history == ()
    chat = chat_request(worker_pb2.Generate(request_id="c", history=[worker_pb2.Turn(role=1, content="hi")]))
    assert chat.raw_prompt is None


def test_the_engine_prefills_exactly_the_raw_text_and_continues_it_greedily(
    tiny_chat_model, tiny_chat_tokenizer
) -> None:
    weights = load_hf_checkpoint(tiny_chat_model)
    graphs = ProbeGraphs(NumpyGraphs(weights, 256))
    engine = LLMEngine(graphs, tiny_chat_tokenizer, "tiny-chat", GREEDY)
    request = ChatRequest("", (), SamplingParams(max_new_tokens=12), raw_prompt=TEXT)
    answer = "".join(chunk.text for chunk in engine.generate(request, threading.Event()))

    prompt = tiny_chat_tokenizer.encode_prompt(TEXT)  # no chat template around it
    assert graphs.named("embedding")[0].args[0].ravel().tolist()[: len(prompt)] == prompt
    expected = Generation(
        NumpyGraphs(weights, 256), prompt, lambda logits, _: int(np.argmax(logits)), 12, (), threading.Event()
    )
    assert answer == tiny_chat_tokenizer.decode(list(expected))


def test_a_raw_prompt_too_long_for_the_context_is_refused(tiny_chat_model, tiny_chat_tokenizer) -> None:
    engine = LLMEngine(
        NumpyGraphs(load_hf_checkpoint(tiny_chat_model), 64), tiny_chat_tokenizer, "tiny", GREEDY
    )
    request = ChatRequest("", (), SamplingParams(max_new_tokens=8), raw_prompt=TEXT * 20)
    with pytest.raises(RequestError, match="exceeds the model's context of 64 tokens"):
        list(engine.generate(request, threading.Event()))


def test_a_raw_prompt_must_leave_room_for_sixteen_new_tokens(tiny_chat_model, tiny_chat_tokenizer) -> None:
    weights = load_hf_checkpoint(tiny_chat_model)
    needed = len(tiny_chat_tokenizer.encode_prompt(TEXT))
    request = ChatRequest("", (), SamplingParams(max_new_tokens=40), raw_prompt=TEXT)

    fits = LLMEngine(NumpyGraphs(weights, needed + 16), tiny_chat_tokenizer, "tiny", GREEDY)
    final = list(fits.generate(request, threading.Event()))[-1]
    assert (final.prompt_tokens, final.completion_tokens) == (needed, 16)

    too_small = LLMEngine(NumpyGraphs(weights, needed + 15), tiny_chat_tokenizer, "tiny", GREEDY)
    with pytest.raises(RequestError) as refused:
        list(too_small.generate(request, threading.Event()))
    assert str(refused.value) == (
        f"the prompt needs {needed} tokens; with room for 16 new tokens that exceeds the model's context of "
        f"{needed + 15} tokens"
    )
