"""The chip's prefill-with-history path (worker/core/sail_history.py) through the sophon.sail
stand-in: a bmodel exported with LLM-TPU's --use_history_kv (block_kv_{i}) prefills only a turn's
new tokens and answers as the same bmodel prefilling from token 0; a bmodel without those graphs
(sophon-demo's) prefills every prompt whole."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from common.config import GenerationDefaults
from worker.core.llm_engine import LLMEngine
from worker.core.request import ASSISTANT, USER, ChatRequest, Chunk, Turn

SEQ_LEN = 256
GREEDY = GenerationDefaults(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
SYSTEM = "You are a helpful assistant."
QUESTIONS = ("Tell me a story about a cat.", "What did the cat eat?", "Where did it sleep?")


def bmodel(tmp_path: Path, model: Path, **options: object) -> Path:
    from sophon._bmodel import write_bmodel

    return write_bmodel(tmp_path / "tiny.bmodel", model, seq_len=SEQ_LEN, dynamic=True, **options)


def converse(engine: LLMEngine, fresh: LLMEngine) -> list[int]:
    """Three turns on `engine`, each answer checked against `fresh`; the cached prompt tokens per turn."""
    history: tuple[Turn, ...] = ()
    cached = []
    for question in QUESTIONS:
        history = (*history, Turn(USER, question))
        request = ChatRequest(SYSTEM, history)
        got: list[Chunk] = list(engine.generate(request, threading.Event()))
        expected = list(fresh.generate(request, threading.Event()))
        assert [c.text for c in got] == [c.text for c in expected]
        cached.append(got[-1].cached_prompt_tokens)
        history = (*history, Turn(ASSISTANT, "".join(c.text for c in got)))
    return cached


def engines(path: Path, tokenizer) -> tuple[LLMEngine, LLMEngine]:
    from worker.core.sail_history import SailHistoryGraphs

    reusing = LLMEngine(SailHistoryGraphs(path), tokenizer, "tiny", GREEDY)
    fresh = LLMEngine(SailHistoryGraphs(path), tokenizer, "tiny", GREEDY, reuse_kv=False)
    return reusing, fresh


@pytest.mark.parametrize("addr_mode", [0, 1])
def test_history_graphs_prefill_only_the_new_turn(
    sail, monkeypatch, tmp_path, tiny_chat_model, tiny_chat_tokenizer, addr_mode
):
    launched: list[str] = []
    process = sail.EngineLLM.process

    def spy(self, graph_name, *args):
        launched.append(graph_name)
        return process(self, graph_name, *args)

    monkeypatch.setattr(sail.EngineLLM, "process", spy)
    reusing, fresh = engines(
        bmodel(tmp_path, tiny_chat_model, history_kv=True, addr_mode=addr_mode), tiny_chat_tokenizer
    )
    assert reusing._graphs.spec.max_history == SEQ_LEN - 1
    cached = converse(reusing, fresh)
    assert cached[0] == 0 and all(count > 0 for count in cached[1:])
    assert "block_kv_0" in launched


def test_the_reusable_prefix_is_bounded_by_prefill_kv_length(
    sail, tmp_path, tiny_chat_model, tiny_chat_tokenizer
):
    reusing, fresh = engines(
        bmodel(tmp_path, tiny_chat_model, history_kv=True, prefill_kv_length=24), tiny_chat_tokenizer
    )
    assert reusing._graphs.spec.max_history == 24
    assert converse(reusing, fresh)[1:] == [24, 24]


def test_without_history_graphs_every_prompt_is_prefilled_whole(
    sail, tmp_path, tiny_chat_model, tiny_chat_tokenizer
):
    reusing, fresh = engines(bmodel(tmp_path, tiny_chat_model), tiny_chat_tokenizer)
    assert reusing._graphs.spec.max_history == 0
    assert converse(reusing, fresh) == [0, 0, 0]
    assert reusing.held_prefix() == (), "nothing to offer the router: it dispatches by LRU"
