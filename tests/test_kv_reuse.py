"""Prefix KV reuse in the engine: a conversation's next turn keeps the keys/values its previous turn
left in the KV cache and prefills only the new tokens. Every case compares, token for token under
greedy decoding, with an engine that prefills every prompt from token 0 (model.reuse_kv false)."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from common.config import GenerationDefaults
from common.prefix_hash import conversation_hashes
from tests.probe_graphs import ProbeGraphs
from worker.core.checkpoint import Weights, load_hf_checkpoint
from worker.core.llm_engine import LLMEngine
from worker.core.numpy_graphs import NumpyGraphs
from worker.core.request import (
    ASSISTANT,
    USER,
    ChatRequest,
    Chunk,
    EngineError,
    FinishReason,
    SamplingParams,
    Turn,
)
from worker.core.tokenizer import Tokenizer

GREEDY = GenerationDefaults(temperature=0.0, repetition_penalty=1.0, max_new_tokens=24)
SYSTEM = "You are a helpful assistant who answers briefly."
QUESTIONS = (
    "Tell me a story about a cat.",
    "What did the cat eat for breakfast?",
    "And where did it sleep afterwards?",
    "Give the cat a name, please.",
)


@pytest.fixture(scope="module")
def weights(tiny_chat_model) -> Weights:
    return load_hf_checkpoint(tiny_chat_model)


class Engines:
    """The engine under test (reuse on, probed) and the reference (reuse off), same weights."""

    def __init__(self, weights: Weights, tokenizer: Tokenizer, seq_len: int = 512) -> None:
        self.graphs = ProbeGraphs(NumpyGraphs(weights, seq_len))
        self.reusing = LLMEngine(self.graphs, tokenizer, "tiny-chat", GREEDY)
        self.fresh = LLMEngine(NumpyGraphs(weights, seq_len), tokenizer, "tiny-chat", GREEDY, reuse_kv=False)

    def turn(self, history: tuple[Turn, ...], system: str = SYSTEM, **params) -> list[Chunk]:
        """One request on the reusing engine, checked against the reference; its chunks."""
        request = ChatRequest(system, history, SamplingParams(**params))
        got = list(self.reusing.generate(request, threading.Event()))
        expected = list(self.fresh.generate(request, threading.Event()))
        assert [(c.text, c.completion_tokens, c.finish_reason) for c in got] == [
            (c.text, c.completion_tokens, c.finish_reason) for c in expected
        ]
        assert expected[-1].cached_prompt_tokens == 0
        return got


def text_of(chunks: list[Chunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


def next_history(history: tuple[Turn, ...], answer: str, question: str) -> tuple[Turn, ...]:
    return (*history, Turn(ASSISTANT, answer), Turn(USER, question))


def prompt_length(tokenizer: Tokenizer, history: tuple[Turn, ...], system: str = SYSTEM) -> int:
    return len(tokenizer.encode_prompt(tokenizer.chat_template.render(system, history)))


def test_a_multi_turn_conversation_reuses_its_cache_and_answers_as_a_fresh_engine(
    weights, tiny_chat_tokenizer
):
    engines = Engines(weights, tiny_chat_tokenizer)
    history: tuple[Turn, ...] = (Turn(USER, QUESTIONS[0]),)
    first = engines.turn(history)
    assert first[-1].cached_prompt_tokens == 0
    previous_prompt = prompt_length(tiny_chat_tokenizer, history)
    answer = text_of(first)
    for question in QUESTIONS[1:]:
        history = next_history(history, answer, question)
        chunks = engines.turn(history)
        cached = chunks[-1].cached_prompt_tokens
        # At least the previous prompt came from the cache (a random model's answer need not tokenize
        # back to the ids it generated: the default model's test checks answers are reused), never all.
        assert previous_prompt <= cached < chunks[-1].prompt_tokens, (previous_prompt, cached)
        assert {chunk.cached_prompt_tokens for chunk in chunks} == {cached}
        previous_prompt = prompt_length(tiny_chat_tokenizer, history)
        answer = text_of(chunks)
    # Only the new tokens were prefilled: the last prefill ran over prompt - cached positions.
    last_prefill = engines.graphs.named("block_with_history")[-1]
    assert last_prefill.args[1].shape == (1, chunks[-1].prompt_tokens - cached)
    assert last_prefill.args[3] == cached


def test_the_engine_reports_the_conversation_it_holds(weights, tiny_chat_tokenizer):
    engines = Engines(weights, tiny_chat_tokenizer)
    history = (Turn(USER, QUESTIONS[0]),)
    assert engines.reusing.held_prefix() == ()
    answer = text_of(engines.turn(history))
    expected = conversation_hashes(SYSTEM, (*history, Turn(ASSISTANT, answer)))
    assert engines.reusing.held_prefix() == tuple(expected)
    assert engines.fresh.held_prefix() == (), "with reuse off there is nothing to offer the router"
    # The router's hash of the next turn's prefixes finds it at depth 2 (system + question + answer).
    following = next_history(history, answer, QUESTIONS[1])
    assert conversation_hashes(SYSTEM, following)[2] == engines.reusing.held_prefix()[-1]


def test_after_a_cancelled_turn_the_next_turn_is_exact(weights, tiny_chat_tokenizer):
    engines = Engines(weights, tiny_chat_tokenizer)
    history = (Turn(USER, QUESTIONS[0]),)
    cancel = threading.Event()
    stream = engines.reusing.generate(ChatRequest(SYSTEM, history), cancel)
    partial = [next(stream) for _ in range(3)]
    cancel.set()
    rest = list(stream)
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    # The client keeps the partial answer as the assistant's turn and goes on.
    history = next_history(history, text_of(partial + rest), QUESTIONS[1])
    chunks = engines.turn(history)
    assert chunks[-1].cached_prompt_tokens > 0

    # A stream the worker closes early (a cancel noticed between chunks) leaves a usable cache too.
    stream = engines.reusing.generate(ChatRequest(SYSTEM, history), threading.Event())
    partial = [next(stream), next(stream)]
    stream.close()
    history = next_history(history, text_of(partial), QUESTIONS[2])
    assert engines.turn(history)[-1].cached_prompt_tokens > 0


@pytest.mark.parametrize("chunks_read", [1, 2])
def test_a_stream_closed_early_reports_the_conversation_with_the_answer_so_far(
    weights, tiny_chat_tokenizer, chunks_read
):
    engines = Engines(weights, tiny_chat_tokenizer)
    history = (Turn(USER, QUESTIONS[0]),)
    stream = engines.reusing.generate(ChatRequest(SYSTEM, history), threading.Event())
    partial = [next(stream) for _ in range(chunks_read)]
    stream.close()  # the worker stops reading: a cancel noticed between chunks

    answer = text_of(partial)
    assert answer
    assert engines.reusing.held_prefix() == tuple(
        conversation_hashes(SYSTEM, (*history, Turn(ASSISTANT, answer)))
    )
    # Another conversation closed early, then the first goes on: the cache was re-described each time.
    other = (Turn(USER, "How do birds build their nests?"),)
    stream = engines.reusing.generate(ChatRequest(SYSTEM, other), threading.Event())
    next(stream)
    stream.close()
    engines.turn(next_history(history, answer, QUESTIONS[1]))


def test_a_turn_cancelled_right_after_its_prefill_reports_its_whole_prompt(weights, tiny_chat_tokenizer):
    engines = Engines(weights, tiny_chat_tokenizer)
    cancel = threading.Event()
    prefill_head = engines.graphs.lm_head

    def cancelling_head(hidden: np.ndarray, index: int) -> np.ndarray:
        cancel.set()  # the cancel lands as the prompt's last step runs: no new token gets computed
        return prefill_head(hidden, index)

    engines.graphs.lm_head = cancelling_head
    history = (Turn(USER, QUESTIONS[0]),)
    chunks = list(engines.reusing.generate(ChatRequest(SYSTEM, history), cancel))

    assert chunks[-1].finish_reason is FinishReason.CANCELLED
    answer = text_of(chunks)
    turns = (*history, Turn(ASSISTANT, answer)) if answer else history
    assert engines.reusing.held_prefix() == tuple(conversation_hashes(SYSTEM, turns))


def test_an_empty_answer_adds_no_assistant_turn_to_what_is_held(weights, tiny_chat_tokenizer):
    engines = Engines(weights, tiny_chat_tokenizer)
    history = (Turn(USER, QUESTIONS[0]),)
    first_text = engines.turn(history)[0].text
    chunks = engines.turn(history, stop=[first_text])  # stops before its first character
    assert (text_of(chunks), chunks[-1].finish_reason) == ("", FinishReason.STOP)
    assert engines.reusing.held_prefix() == tuple(conversation_hashes(SYSTEM, history))


@pytest.mark.parametrize("max_history", [0, 1])
def test_a_history_graph_bounds_what_is_reused(weights, tiny_chat_tokenizer, max_history):
    """max_history 0: the bmodel has no prefill-with-history graph, nothing is reused or reported."""
    engines = Engines(weights, tiny_chat_tokenizer)
    engines.graphs.spec = replace(engines.graphs.spec, max_history=max_history)
    engines.reusing = LLMEngine(engines.graphs, tiny_chat_tokenizer, "tiny-chat", GREEDY)
    history = (Turn(USER, QUESTIONS[0]),)
    answer = text_of(engines.turn(history))
    assert bool(engines.reusing.held_prefix()) == (max_history > 0)
    chunks = engines.turn(next_history(history, answer, QUESTIONS[1]))
    assert chunks[-1].cached_prompt_tokens == max_history
    assert len(engines.graphs.named("block_with_history")) == (2 if max_history else 0)  # 2 layers


def test_a_turn_cancelled_before_its_prefill_keeps_only_the_shared_prefix(weights, tiny_chat_tokenizer):
    engines = Engines(weights, tiny_chat_tokenizer)
    history = (Turn(USER, QUESTIONS[0]),)
    answer = text_of(engines.turn(history))
    other = (Turn(USER, "Something else entirely: how do birds fly?"),)
    cancel = threading.Event()
    cancel.set()
    chunks = list(engines.reusing.generate(ChatRequest(SYSTEM, other), cancel))
    assert chunks[-1].finish_reason is FinishReason.CANCELLED
    assert engines.reusing.held_prefix() == tuple(conversation_hashes(SYSTEM, ())), "only the system message"
    history = next_history(history, answer, QUESTIONS[1])
    engines.turn(history)


def test_after_a_length_stop_the_next_turn_is_exact(weights, tiny_chat_tokenizer):
    engines = Engines(weights, tiny_chat_tokenizer)
    history = (Turn(USER, QUESTIONS[0]),)
    chunks = engines.turn(history, max_new_tokens=5)
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    history = next_history(history, text_of(chunks), QUESTIONS[1])
    chunks = engines.turn(history, max_new_tokens=7)
    assert chunks[-1].cached_prompt_tokens > 0
    history = next_history(history, text_of(chunks), QUESTIONS[2])
    assert engines.turn(history)[-1].cached_prompt_tokens > 0


def test_after_the_history_is_trimmed_to_fit_the_prefill_starts_over(weights, tiny_chat_tokenizer):
    engines = Engines(weights, tiny_chat_tokenizer, seq_len=160)
    history: tuple[Turn, ...] = (Turn(USER, QUESTIONS[0]),)
    first_turn_tokens = prompt_length(tiny_chat_tokenizer, history, system="")
    trimmed = False
    for question in QUESTIONS[1:] * 3:
        chunks = engines.turn(history, system="")
        history = next_history(history, text_of(chunks), question)
        trimmed = trimmed or prompt_length(tiny_chat_tokenizer, history, system="") + 16 > 160
    assert trimmed, "the conversation never outgrew the context"
    # Once the oldest turns are dropped, the prompt no longer starts like the cached one: at most the
    # template's fixed opening matches, and nothing is reported to the router.
    chunks = engines.turn(history, system="")
    assert chunks[-1].cached_prompt_tokens < first_turn_tokens
    assert engines.reusing.held_prefix() == ()


def test_after_an_engine_error_nothing_is_reused(weights, tiny_chat_tokenizer):
    engines = Engines(weights, tiny_chat_tokenizer)
    history = (Turn(USER, QUESTIONS[0]),)
    answer = text_of(engines.turn(history))
    history = next_history(history, answer, QUESTIONS[1])
    engines.graphs.fail_at_call = len(engines.graphs.calls) + 12  # inside the decode of the next turn
    with pytest.raises(EngineError):
        list(engines.reusing.generate(ChatRequest(SYSTEM, history), threading.Event()))
    assert engines.reusing.held_prefix() == ()
    chunks = engines.turn(history)
    assert chunks[-1].cached_prompt_tokens == 0


def test_two_interleaved_conversations_on_one_engine(weights, tiny_chat_tokenizer):
    engines = Engines(weights, tiny_chat_tokenizer)
    conversations = {
        "a": (Turn(USER, QUESTIONS[0]),),
        "b": (Turn(USER, "How do birds build their nests?"),),
    }
    cached = []
    for question in QUESTIONS[1:]:
        for name in ("a", "b"):
            chunks = engines.turn(conversations[name])
            cached.append(chunks[-1].cached_prompt_tokens)
            conversations[name] = next_history(conversations[name], text_of(chunks), question)
    # Each reuses only the shared system prompt from the other's cache (same tokens, same positions).
    system_tokens = prompt_length(tiny_chat_tokenizer, (Turn(USER, "x"),)) - prompt_length(
        tiny_chat_tokenizer, (Turn(USER, "x"),), system=""
    )
    assert all(0 < count < system_tokens + 8 for count in cached[1:])


def test_a_request_never_reads_the_cache_beyond_the_prefix_it_shares(weights, tiny_chat_tokenizer):
    engines = Engines(weights, tiny_chat_tokenizer)
    shared = (Turn(USER, QUESTIONS[0]), Turn(ASSISTANT, "Once upon a time a cat sat on a mat."))
    engines.turn((*shared, Turn(USER, "Tell me more about the mat and its colours, please.")))
    held = len(engines.reusing._kv_prefix.tokens)
    branch = (*shared, Turn(USER, "Why do dogs bark at night?"))
    common = engines.reusing._kv_prefix.shared_with(
        tiny_chat_tokenizer.encode_prompt(tiny_chat_tokenizer.chat_template.render(SYSTEM, branch))
    )
    assert 0 < common < held
    # Poison every cache row past the shared prefix: one read of them would turn the answer into NaN.
    inner = engines.graphs.inner
    inner.k_cache[:, common:] = np.nan
    inner.v_cache[:, common:] = np.nan
    chunks = engines.turn(branch)
    assert chunks[-1].cached_prompt_tokens == common
    assert chunks[-1].completion_tokens > 0


@pytest.mark.slow
def test_the_default_model_reuses_its_answers_and_answers_as_a_fresh_engine():
    from worker.core.model_files import load_numpy_model

    weights, tokenizer = load_numpy_model("builtin:smollm2", None)
    engines = Engines(weights, tokenizer, seq_len=1024)
    history: tuple[Turn, ...] = (Turn(USER, "What is the capital of France?"),)
    answer = text_of(engines.turn(history, max_new_tokens=16))
    for question in ("And of Italy?", "Which of the two is larger?"):
        previous_prompt = prompt_length(tokenizer, history)
        history = next_history(history, answer, question)
        chunks = engines.turn(history, max_new_tokens=16)
        # A real model's answer tokenizes back to (nearly) the ids it generated: they are reused too.
        assert previous_prompt + 8 < chunks[-1].cached_prompt_tokens < chunks[-1].prompt_tokens
        answer = text_of(chunks)
