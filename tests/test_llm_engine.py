"""LLMEngine end to end on the tests' tiny chat model (random Qwen2, trained byte-level BPE, ChatML):
chunks, stop strings, limits, context overflow, cancellation, failures and greedy-only heads."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import numpy as np
import pytest

from common.config import GenerationDefaults
from tests.probe_graphs import ProbeGraphs
from tests.tiny_models import random_tensors, tiny_config, write_hf_checkpoint
from worker.core.checkpoint import Weights, load_hf_checkpoint
from worker.core.driver import Generation
from worker.core.llm_engine import LLMEngine
from worker.core.numpy_graphs import NumpyGraphs
from worker.core.request import (
    ASSISTANT,
    USER,
    ChatRequest,
    Chunk,
    EngineError,
    FinishReason,
    RequestError,
    SamplingParams,
    Turn,
)
from worker.core.tokenizer import Tokenizer

QUESTION = (Turn(USER, "Tell me a story about a cat."),)
GREEDY = GenerationDefaults(temperature=0.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def weights(tiny_chat_model) -> Weights:
    return load_hf_checkpoint(tiny_chat_model)


def make_engine(weights, tokenizer, *, seq_len=256, greedy_head=False, defaults=GREEDY) -> LLMEngine:
    return probed_engine(weights, tokenizer, seq_len=seq_len, greedy_head=greedy_head, defaults=defaults)[0]


def probed_engine(weights, tokenizer, *, seq_len=256, greedy_head=False, defaults=GREEDY):
    graphs = ProbeGraphs(NumpyGraphs(weights, seq_len), greedy_head=greedy_head)
    return LLMEngine(graphs, tokenizer, "tiny-chat", defaults), graphs


def ask(engine: LLMEngine, history=QUESTION, system="", cancel=None, **params) -> list[Chunk]:
    request = ChatRequest(system, history, SamplingParams(**params))
    return list(engine.generate(request, cancel or threading.Event()))


def text_of(chunks: list[Chunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


def prompt_ids(tokenizer: Tokenizer, history, system="") -> list[int]:
    return tokenizer.encode_prompt(tokenizer.chat_template.render(system, history))


@pytest.fixture(scope="module")
def greedy_answer(weights, tiny_chat_tokenizer) -> str:
    """40 greedy tokens for QUESTION, computed with the driver directly (not through LLMEngine)."""
    graphs = NumpyGraphs(weights, 256)
    prompt = prompt_ids(tiny_chat_tokenizer, QUESTION)
    ids = list(
        Generation(graphs, prompt, lambda logits, _: int(np.argmax(logits)), 40, (), threading.Event())
    )
    return tiny_chat_tokenizer.decode(ids)


def test_chunks_carry_the_whole_answer_and_end_with_the_reason(weights, tiny_chat_tokenizer, greedy_answer):
    chunks = ask(make_engine(weights, tiny_chat_tokenizer), max_new_tokens=40)

    assert text_of(chunks) == greedy_answer
    assert all(chunk.text for chunk in chunks[:-1])
    assert [chunk.finish_reason for chunk in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].completion_tokens == 40
    counts = [chunk.completion_tokens for chunk in chunks]
    assert counts == sorted(counts)
    assert {chunk.prompt_tokens for chunk in chunks} == {len(prompt_ids(tiny_chat_tokenizer, QUESTION))}


@pytest.mark.parametrize("start", [0, 7, 15, 30])
def test_stop_strings_cut_the_answer_exactly(weights, tiny_chat_tokenizer, greedy_answer, start):
    stop = greedy_answer[start : start + 5]
    assert len(stop) == 5
    chunks = ask(make_engine(weights, tiny_chat_tokenizer), max_new_tokens=40, stop=(stop, "never seen"))

    assert text_of(chunks) == greedy_answer[: greedy_answer.index(stop)]
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert all(chunk.text for chunk in chunks[:-1])


def test_a_stop_string_ends_with_the_counts_of_the_tokens_it_took(
    weights, tiny_chat_tokenizer, greedy_answer
):
    engine, graphs = probed_engine(weights, tiny_chat_tokenizer)
    stop = greedy_answer[20:25]
    chunks = ask(engine, max_new_tokens=40, stop=(stop,))
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert chunks[-1].completion_tokens == len(graphs.named("lm_head")) < 40  # every token decoded so far
    assert chunks[-1].prompt_tokens == len(prompt_ids(tiny_chat_tokenizer, QUESTION))


def test_an_end_of_sequence_token_ends_the_answer_and_is_counted(weights, tiny_chat_tokenizer):
    engine, graphs = probed_engine(weights, tiny_chat_tokenizer)
    (eos,) = sorted(tiny_chat_tokenizer.eos_token_ids)[:1]
    graphs.forced_tokens[4] = eos  # three answer tokens, then end of sequence
    chunks = ask(engine, max_new_tokens=40)
    assert text_of(chunks) == text_of(ask(make_engine(weights, tiny_chat_tokenizer), max_new_tokens=3))
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert chunks[-1].completion_tokens == 4  # the end-of-sequence token counts (as vLLM counts it)
    assert chunks[-1].prompt_tokens == len(prompt_ids(tiny_chat_tokenizer, QUESTION))
    assert [chunk.completion_tokens for chunk in chunks[:-1]] == sorted(
        {c.completion_tokens for c in chunks[:-1]}
    )


def test_the_configured_sampling_defaults_apply_to_what_a_request_leaves_out(weights, tiny_chat_tokenizer):
    greedy = text_of(ask(make_engine(weights, tiny_chat_tokenizer), max_new_tokens=12))
    # top_k 1 from the defaults: sampling that can only pick the best token, i.e. greedy.
    top_k_one = GenerationDefaults(temperature=1.0, top_k=1, top_p=1.0, repetition_penalty=1.0, seed=3)
    assert (
        text_of(ask(make_engine(weights, tiny_chat_tokenizer, defaults=top_k_one), max_new_tokens=12))
        == greedy
    )
    # A tiny top_p from the defaults does the same; the configured seed makes sampling reproducible.
    top_p_tiny = GenerationDefaults(temperature=1.0, top_k=0, top_p=1e-6, repetition_penalty=1.0, seed=3)
    assert (
        text_of(ask(make_engine(weights, tiny_chat_tokenizer, defaults=top_p_tiny), max_new_tokens=12))
        == greedy
    )
    seeded = GenerationDefaults(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=3)
    answers = {
        text_of(ask(make_engine(weights, tiny_chat_tokenizer, defaults=seeded), max_new_tokens=12))
        for _ in "ab"
    }
    assert len(answers) == 1 and greedy not in answers
    # A repetition penalty from the defaults changes the greedy answer; a penalty window of 0 turns it off.
    penalized = GenerationDefaults(temperature=0.0, repetition_penalty=5.0, penalty_window=64)
    assert (
        text_of(ask(make_engine(weights, tiny_chat_tokenizer, defaults=penalized), max_new_tokens=12))
        != greedy
    )
    # The request's own values win over the defaults.
    engine = make_engine(weights, tiny_chat_tokenizer, defaults=seeded)
    assert text_of(ask(engine, max_new_tokens=12, top_k=1)) == greedy
    assert text_of(ask(engine, max_new_tokens=12, temperature=0.0, repetition_penalty=5.0)) != greedy
    no_window = GenerationDefaults(temperature=0.0, repetition_penalty=5.0, penalty_window=0)
    assert (
        text_of(ask(make_engine(weights, tiny_chat_tokenizer, defaults=no_window), max_new_tokens=12))
        == greedy
    )


def test_max_new_tokens_gives_length(weights, tiny_chat_tokenizer):
    chunks = ask(make_engine(weights, tiny_chat_tokenizer), max_new_tokens=5)
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].completion_tokens == 5
    (one,) = ask(make_engine(weights, tiny_chat_tokenizer), max_new_tokens=1)  # the smallest answer
    assert (one.completion_tokens, one.finish_reason) == (1, FinishReason.LENGTH)


def test_seeded_sampling_is_reproducible(weights, tiny_chat_tokenizer):
    engine = make_engine(weights, tiny_chat_tokenizer)
    sampled = [
        text_of(ask(engine, max_new_tokens=30, temperature=0.9, top_p=0.95, seed=s)) for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]


def long_conversation() -> tuple[Turn, ...]:
    turns = []
    for index, topic in enumerate(["dogs", "birds", "fish", "frogs"]):
        turns.append(Turn(USER, f"Question {index}: what do {topic} like to do all day long?"))
        turns.append(Turn(ASSISTANT, f"Answer {index}: {topic} like to play in the sun with their friends."))
    turns.append(Turn(USER, "Last question: tell me about cats."))
    return tuple(turns)


def test_context_overflow_drops_the_oldest_turns_and_keeps_system_and_last_user_turn(
    weights, tiny_chat_tokenizer, caplog
):
    caplog.set_level(logging.INFO, logger="worker.core.llm_engine")
    history = long_conversation()
    system = "You tell short stories."
    whole = len(prompt_ids(tiny_chat_tokenizer, history, system))
    kept_from = 4  # keep two question/answer pairs and the last question
    fitting = len(prompt_ids(tiny_chat_tokenizer, history[kept_from:], system))
    one_more = len(prompt_ids(tiny_chat_tokenizer, history[kept_from - 2 :], system))
    seq_len = fitting + 16  # exactly room for MIN_ANSWER_ROOM (16) new tokens
    assert fitting + 16 <= seq_len < one_more + 16 <= whole + 16
    engine, graphs = probed_engine(weights, tiny_chat_tokenizer, seq_len=seq_len)

    chunks = ask(engine, history=history, system=system, max_new_tokens=50)

    assert chunks[-1].prompt_tokens == fitting
    prefill_ids = graphs.named("embedding")[0].args[0][0].tolist()
    prompt_text = tiny_chat_tokenizer.decode(prefill_ids)
    assert system in prompt_text and "Last question: tell me about cats." in prompt_text
    assert (
        "Question 2:" in prompt_text and "Question 1:" not in prompt_text and "Answer 1:" not in prompt_text
    )
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].completion_tokens == seq_len - fitting  # the context, not max_new_tokens, ended it
    assert f"tiny-chat: dropped {kept_from} oldest turns to fit the context" in caplog.messages


def test_a_last_turn_too_long_for_the_context_is_refused(weights, tiny_chat_tokenizer):
    engine, graphs = probed_engine(weights, tiny_chat_tokenizer, seq_len=64)
    history = (Turn(USER, "Hello there."), Turn(ASSISTANT, "Hi."), Turn(USER, "word " * 80))
    with pytest.raises(RequestError, match="exceeds the model's context of 64 tokens"):
        ask(engine, history=history)
    assert graphs.calls == []  # refused before running anything


def test_cancel_stops_within_one_token(weights, tiny_chat_tokenizer):
    engine, graphs = probed_engine(weights, tiny_chat_tokenizer)
    cancel = threading.Event()
    chunks = []
    for chunk in engine.generate(ChatRequest("", QUESTION, SamplingParams(max_new_tokens=100)), cancel):
        chunks.append(chunk)
        cancel.set()

    assert len(chunks) == 2
    assert chunks[-1].finish_reason is FinishReason.CANCELLED
    assert chunks[-1].completion_tokens == chunks[0].completion_tokens
    assert len(graphs.named("embedding_cache")) == chunks[0].completion_tokens - 1


@pytest.mark.parametrize(
    ("fail_at_call", "step"),
    # 2 layers: the prefill is calls 1-4 (embedding, block x2, lm_head), each decode step 4 more. So
    # inside the prefill; inside the 9th decode step, after tokens streamed.
    [(3, "block"), (38, "block_cache")],
)
def test_a_failing_graph_gives_engine_error_a_zeroed_kv_cache_and_a_fresh_next_answer(
    weights, tiny_chat_tokenizer, greedy_answer, fail_at_call, step, caplog
):
    engine, graphs = probed_engine(weights, tiny_chat_tokenizer)
    graphs.fail_at_call = fail_at_call
    request = ChatRequest("", QUESTION, SamplingParams(max_new_tokens=40))
    streamed = []

    with pytest.raises(EngineError) as failed:
        for chunk in engine.generate(request, threading.Event()):
            streamed.append(chunk)

    assert str(failed.value) == f"generation failed: RuntimeError: injected failure in {step}"
    assert caplog.messages == ["tiny-chat: generation failed"]  # with the traceback, for the operator

    assert bool(streamed) == (step == "block_cache")
    assert [call.graph for call in graphs.calls[fail_at_call - 1 :]] == [step, "reset"]
    assert not graphs.inner.k_cache.any() and not graphs.inner.v_cache.any()
    assert text_of(ask(engine, max_new_tokens=40)) == greedy_answer  # what a fresh engine answers


def test_a_reset_that_fails_too_is_reported_with_the_first_failure(
    weights, tiny_chat_tokenizer, monkeypatch, caplog
):
    engine, graphs = probed_engine(weights, tiny_chat_tokenizer)
    graphs.fail_at_call = 3

    def lost_device() -> None:
        raise RuntimeError("device lost")

    monkeypatch.setattr(graphs.inner, "reset", lost_device)
    with pytest.raises(EngineError) as failed:
        ask(engine)
    assert str(failed.value) == (
        "generation failed: RuntimeError: injected failure in block; "
        "resetting the KV cache failed too: RuntimeError: device lost"
    )
    assert caplog.messages == ["tiny-chat: generation failed", "tiny-chat: resetting the KV cache failed"]


def test_greedy_only_head_refuses_sampling_requests(weights, tiny_chat_tokenizer, greedy_answer, caplog):
    with caplog.at_level(logging.WARNING):
        engine = make_engine(weights, tiny_chat_tokenizer, greedy_head=True, defaults=GenerationDefaults())
    assert caplog.messages == [
        "tiny-chat: the bmodel's lm_head returns token ids (greedy decoding compiled in); requests that ask "
        "for sampling (temperature > 0, top_k, top_p, repetition_penalty) will be refused"
    ]

    for params in ({"temperature": 0.7}, {"top_k": 40}, {"top_p": 0.5}, {"repetition_penalty": 1.2}):
        with pytest.raises(RequestError, match="greedy decoding compiled into its bmodel"):
            ask(engine, max_new_tokens=40, **params)

    with pytest.raises(RequestError) as refused:
        ask(engine, max_new_tokens=40, temperature=0.7, top_k=40, top_p=0.5, repetition_penalty=1.2)
    assert str(refused.value) == (
        "model tiny-chat has greedy decoding compiled into its bmodel (lm_head returns token ids), so "
        "sampling cannot be applied: remove temperature, top_k, top_p, repetition_penalty from the request "
        "or use temperature 0"
    )

    # Config defaults (temperature 0.7) do not apply; neutral explicit values are accepted.
    assert text_of(ask(engine, max_new_tokens=40)) == greedy_answer
    neutral = {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 5}
    for top_k in (0, 1):
        assert text_of(ask(engine, max_new_tokens=40, top_k=top_k, **neutral)) == greedy_answer


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_invalid_parameters_are_request_errors(weights, tiny_chat_tokenizer, params, message):
    with pytest.raises(RequestError, match=message):
        ask(make_engine(weights, tiny_chat_tokenizer), **params)


def test_a_conversation_must_end_with_the_user(weights, tiny_chat_tokenizer):
    with pytest.raises(RequestError) as refused:
        ask(
            make_engine(weights, tiny_chat_tokenizer),
            history=(*QUESTION, Turn(ASSISTANT, "Once upon a time")),
        )
    assert str(refused.value) == "the conversation must end with a user turn"


def test_a_prompt_must_leave_room_for_sixteen_new_tokens(weights, tiny_chat_tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="worker.core.llm_engine")
    needed = len(prompt_ids(tiny_chat_tokenizer, QUESTION))

    chunks = ask(make_engine(weights, tiny_chat_tokenizer, seq_len=needed + 16), max_new_tokens=40)
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (needed, 16)
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert not [message for message in caplog.messages if "dropped" in message], "no turn was dropped"

    with pytest.raises(RequestError) as refused:
        ask(make_engine(weights, tiny_chat_tokenizer, seq_len=needed + 15), max_new_tokens=40)
    assert str(refused.value) == (
        f"the prompt needs {needed} tokens even with only the system message and the last user turn; with "
        f"room for 16 new tokens that exceeds the model's context of {needed + 15} tokens"
    )


def test_a_prompt_longer_than_the_prefill_graphs_is_refused_even_when_the_context_has_room(
    weights, tiny_chat_tokenizer
):
    needed = len(prompt_ids(tiny_chat_tokenizer, QUESTION))

    def engine_with_prefill_length(longest: int) -> LLMEngine:
        graphs = ProbeGraphs(NumpyGraphs(weights, 256))
        graphs.spec = replace(graphs.spec, max_input_length=longest)  # as LLM-TPU's MAX_INPUT_LENGTH
        return LLMEngine(graphs, tiny_chat_tokenizer, "tiny-chat", GREEDY)

    assert ask(engine_with_prefill_length(needed), max_new_tokens=4)[-1].prompt_tokens == needed
    with pytest.raises(RequestError) as refused:
        ask(engine_with_prefill_length(needed - 1), max_new_tokens=4)
    assert str(refused.value) == (
        f"the prompt needs {needed} tokens even with only the system message and the last user turn; with "
        f"room for 4 new tokens that exceeds the model's context of 256 tokens (or its longest prompt, "
        f"{needed - 1} tokens)"
    )


@pytest.mark.parametrize(
    ("history", "kept_from"),
    [
        pytest.param(
            (
                Turn(USER, "A long first question about the dogs and the birds in the garden today?"),
                Turn(ASSISTANT, "Yes."),
                Turn(USER, "Tell me about cats."),
            ),
            2,
            id="an-answer-left-first-goes-too",
        ),
        pytest.param(
            (
                Turn(USER, "First question about the dogs?"),
                Turn(USER, "Second question about the birds?"),
                Turn(ASSISTANT, "Birds sing."),
                Turn(USER, "Tell me about cats."),
            ),
            1,
            id="one-turn-at-a-time",
        ),
    ],
)
def test_dropping_turns_removes_one_turn_at_a_time_and_never_starts_with_an_answer(
    weights, tiny_chat_tokenizer, caplog, history, kept_from
):
    """The context holds all but the oldest turn exactly: the oldest goes, and so does an assistant
    turn it leaves first (a prompt never starts with the assistant), nothing more."""
    caplog.set_level(logging.INFO, logger="worker.core.llm_engine")
    seq_len = len(prompt_ids(tiny_chat_tokenizer, history[1:])) + 16
    assert len(prompt_ids(tiny_chat_tokenizer, history)) + 16 > seq_len

    engine = make_engine(weights, tiny_chat_tokenizer, seq_len=seq_len)
    chunks = ask(engine, history=history, max_new_tokens=4)

    assert chunks[-1].prompt_tokens == len(prompt_ids(tiny_chat_tokenizer, history[kept_from:]))
    assert f"tiny-chat: dropped {kept_from} oldest turns to fit the context" in caplog.messages


def test_greedy_requests_take_the_token_from_the_device_when_the_bmodel_can(
    weights, tiny_chat_tokenizer, greedy_answer
):
    graphs = ProbeGraphs(NumpyGraphs(weights, 256))
    graphs.spec = replace(graphs.spec, device_greedy=True)  # a bmodel with a greedy_head graph
    engine = LLMEngine(graphs, tiny_chat_tokenizer, "tiny-chat", GREEDY)

    assert text_of(ask(engine, max_new_tokens=40)) == greedy_answer
    assert graphs.named("greedy_token") and not graphs.named("lm_head"), "no logits crossed to the host"

    graphs.calls.clear()
    ask(engine, max_new_tokens=5, temperature=0.8, seed=3)  # sampling needs the logits
    assert graphs.named("lm_head") and not graphs.named("greedy_token")


@pytest.fixture(scope="module")
def spm_weights(tiny_spm_tokenizer, tmp_path_factory) -> Weights:
    """A random model over the byte-fallback tokenizer's vocabulary."""
    config = tiny_config("llama", vocab_size=tiny_spm_tokenizer.vocab_size)
    folder = tmp_path_factory.mktemp("tiny-spm-model")
    return load_hf_checkpoint(write_hf_checkpoint(folder, config, random_tensors(config, 7, bias=False)))


def test_a_stop_string_completed_by_the_last_byte_tokens_ends_the_answer_before_it(
    spm_weights, tiny_spm_tokenizer
):
    """A character spelled in byte tokens is held back until its run ends; when the generation
    ends inside the run, the final flush releases it, and a stop string it completes still stops."""
    graphs = ProbeGraphs(NumpyGraphs(spm_weights, 128))
    words = tiny_spm_tokenizer.encode("Lily")
    bytes_of = tiny_spm_tokenizer.byte_token_ids
    byte_ids = [token for token in tiny_spm_tokenizer.encode("你") if token in bytes_of]
    forced = [*words, *byte_ids]
    assert len(byte_ids) == 3 and tiny_spm_tokenizer.decode(forced) == "Lily你"
    graphs.forced_tokens = dict(enumerate(forced, start=1))
    engine = LLMEngine(graphs, tiny_spm_tokenizer, "tiny-spm", GREEDY)
    prompt = "Once upon a time"
    params = SamplingParams(max_new_tokens=len(forced), stop=["你"])
    request = ChatRequest("", (), params, raw_prompt=prompt)

    chunks = list(engine.generate(request, threading.Event()))

    needed = len(tiny_spm_tokenizer.encode_prompt(prompt))
    assert text_of(chunks[:-1]) == "Lily"
    final = chunks[-1]
    assert (final.text, final.completion_tokens, final.prompt_tokens, final.finish_reason) == (
        "",
        len(forced),
        needed,
        FinishReason.STOP,
    )
