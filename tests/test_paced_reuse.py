"""The paced engine's model of prefill cost and KV reuse (used by the multi-turn benchmark): it
charges prefill time only for the turns a prompt does not share with the conversation it holds."""

from __future__ import annotations

import threading

from common.config import ModelConfig, PacedConfig
from common.prefix_hash import conversation_hashes
from worker.core.paced import PacedEngine, estimate_prompt_tokens
from worker.core.request import ASSISTANT, USER, ChatRequest, EngineError, FinishReason, Turn

PACE = PacedConfig(
    tokens_per_second=0.0, first_token_delay_s=0.0, tokens_per_request=3, echo=True, fail_marker="boom"
)


def engine(reuse_kv: bool = True) -> PacedEngine:
    return PacedEngine(
        ModelConfig(name="p", engine="paced", context_size=4096, paced=PACE, reuse_kv=reuse_kv)
    )


def run(paced: PacedEngine, history: tuple[Turn, ...]) -> tuple[str, int, int]:
    chunks = list(paced.generate(ChatRequest("system prompt", history), threading.Event()))
    return "".join(c.text for c in chunks), chunks[-1].cached_prompt_tokens, chunks[-1].prompt_tokens


def test_the_next_turn_is_charged_only_for_its_new_turns():
    paced = engine()
    first = (Turn(USER, "a question about cats " * 20),)
    answer, cached, _ = run(paced, first)
    assert cached == 0
    assert paced.held_prefix() == tuple(
        conversation_hashes("system prompt", (*first, Turn(ASSISTANT, answer)))
    )
    second = (*first, Turn(ASSISTANT, answer), Turn(USER, "and dogs?"))
    _, cached, prompt = run(paced, second)
    shared = estimate_prompt_tokens(ChatRequest("system prompt", (*first, Turn(ASSISTANT, answer))))
    assert cached == shared and prompt > cached
    assert run(engine(reuse_kv=False), second)[1] == 0


def test_an_engine_error_empties_what_it_holds():
    paced = engine()
    run(paced, (Turn(USER, "hello"),))
    assert paced.held_prefix()
    try:
        run(paced, (Turn(USER, "boom"),))
    except EngineError:
        pass
    else:
        raise AssertionError("the fail marker did not fail")
    assert paced.held_prefix() == ()


def test_a_cancel_before_the_first_token_keeps_only_the_shared_prefix():
    paced = engine()
    run(paced, (Turn(USER, "hello"),))
    cancel = threading.Event()
    cancel.set()
    chunks = list(paced.generate(ChatRequest("system prompt", (Turn(USER, "other"),)), cancel))
    assert chunks[-1].finish_reason is FinishReason.CANCELLED
    assert paced.held_prefix() == tuple(conversation_hashes("system prompt", ()))
