"""Clean stream ends: an answer cut in the middle of a multi-byte character (by max_new_tokens, the
context or a cancel) ends before that character instead of with U+FFFD; invalid bytes in the middle
of the text still show as U+FFFD. Sampled answers of a byte-level BPE model, end to end through the
engine, with the generated ids recorded to know where each answer was really cut."""

from __future__ import annotations

import threading

import pytest

from common.config import GenerationDefaults
from worker.core import llm_engine
from worker.core.checkpoint import load_hf_checkpoint
from worker.core.detokenizer import StreamDecoder
from worker.core.llm_engine import LLMEngine
from worker.core.numpy_graphs import NumpyGraphs
from worker.core.request import USER, ChatRequest, FinishReason, SamplingParams, Turn

REPLACEMENT = "\ufffd"


@pytest.fixture
def recorded_ids(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The ids each generation pushed into its StreamDecoder, one list per generation."""
    generations: list[list[int]] = []

    class Recording(StreamDecoder):
        def __init__(self, tokenizer) -> None:
            super().__init__(tokenizer)
            self._pushed: list[int] = []
            generations.append(self._pushed)

        def push(self, token_id: int) -> str:
            self._pushed.append(token_id)
            return super().push(token_id)

    monkeypatch.setattr(llm_engine, "StreamDecoder", Recording)
    return generations


@pytest.fixture(scope="module")
def engine(tiny_chat_model, tiny_chat_tokenizer) -> LLMEngine:
    graphs = NumpyGraphs(load_hf_checkpoint(tiny_chat_model), 256)
    sampling = GenerationDefaults(temperature=1.0, top_k=0, top_p=1.0)
    return LLMEngine(graphs, tiny_chat_tokenizer, "tiny", sampling)


def sampled(
    engine: LLMEngine, seed: int, max_new_tokens: int, cancel_after: int | None = None
) -> tuple[str, FinishReason]:
    params = SamplingParams(max_new_tokens=max_new_tokens, seed=seed)
    request = ChatRequest("", (Turn(USER, "请介绍一下你自己。今天天气很好"),), params)
    cancel = threading.Event()
    text, last = "", None
    for chunk in engine.generate(request, cancel):
        text, last = text + chunk.text, chunk
        if cancel_after is not None and chunk.completion_tokens >= cancel_after:
            cancel.set()
    return text, last.finish_reason


def test_sampled_answers_cut_mid_character_end_before_it(engine, tiny_chat_tokenizer, recorded_ids):
    cut_mid_character = 0
    for seed in range(60):
        text, finish = sampled(engine, seed, max_new_tokens=5 + seed % 7)
        whole = tiny_chat_tokenizer.decode(recorded_ids[-1])
        assert finish in (FinishReason.LENGTH, FinishReason.STOP)
        assert not text.endswith(REPLACEMENT), (seed, text)
        assert text == whole.rstrip(REPLACEMENT)
        cut_mid_character += whole.endswith(REPLACEMENT)
    assert cut_mid_character >= 3  # the cut really fell inside characters, or this proved nothing


def test_a_cancelled_answer_also_ends_cleanly(engine, tiny_chat_tokenizer, recorded_ids):
    endings = []
    for seed in range(40):
        text, finish = sampled(engine, seed, max_new_tokens=64, cancel_after=3 + seed % 5)
        assert finish in (FinishReason.CANCELLED, FinishReason.STOP)
        whole = tiny_chat_tokenizer.decode(recorded_ids[-1])
        assert text == whole.rstrip(REPLACEMENT)
        endings.append(whole.endswith(REPLACEMENT))
    assert any(endings)


def test_invalid_bytes_inside_the_text_stay_visible(tiny_chat_tokenizer):
    """A stray continuation byte followed by text is not an unfinished character: it stays U+FFFD."""
    stray = tiny_chat_tokenizer.encode("鱻")[-1]  # a rare character's last byte: alone, invalid UTF-8
    ids = [stray, *tiny_chat_tokenizer.encode("ok")]
    decoder = StreamDecoder(tiny_chat_tokenizer)
    text = "".join(decoder.push(token_id) for token_id in ids) + decoder.flush()
    assert tiny_chat_tokenizer.decode([stray]) == REPLACEMENT
    assert text == REPLACEMENT + "ok"
