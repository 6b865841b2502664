"""KV reuse end to end: a supervisor, the router and two numpy workers of the tests' tiny chat model
on loopback. A conversation's turns, one of them cancelled by its client mid-answer, land on the
worker holding it, reuse its cache, and answer token for token as an engine prefilling from 0."""

from __future__ import annotations

import re
import threading
from pathlib import Path

from common.config import GenerationDefaults
from protos import inference_pb2 as api
from tests.harness import inference_stub, start_pool, wait_until, write_config
from worker.core.checkpoint import load_hf_checkpoint
from worker.core.llm_engine import LLMEngine
from worker.core.numpy_graphs import NumpyGraphs
from worker.core.request import ChatRequest, Turn
from worker.core.tokenizer import load_tokenizer

SYSTEM = "You are a helpful assistant."
CONTEXT = 1024
TIMEOUT_S = 60
DEFAULTS = {"max_new_tokens": 16, "temperature": 0.0, "repetition_penalty": 1.0}
QUESTIONS = ("Tell me a story about a cat.", "What did it eat?", "Where did it sleep?", "And then?")


def fresh_answer(engine: LLMEngine, history: list[api.ChatMessage]) -> str:
    request = ChatRequest(SYSTEM, tuple(Turn(turn.role, turn.content) for turn in history))
    return "".join(chunk.text for chunk in engine.generate(request, threading.Event()))


def test_a_conversation_through_the_pool_reuses_its_cache_and_answers_exactly(
    procs, tmp_path, tiny_chat_model: Path
):
    config = write_config(
        tmp_path,
        {
            "model": {
                "name": "tiny",
                "engine": "numpy",
                "path": str(tiny_chat_model),
                "context_size": CONTEXT,
                "defaults": DEFAULTS,
            },
            "workers": {"allow_cpu_oversubscription": True},
        },
    )
    pool = start_pool(procs, config)
    stub = inference_stub(pool.channel)
    fresh = LLMEngine(
        NumpyGraphs(load_hf_checkpoint(tiny_chat_model), CONTEXT),
        load_tokenizer(tiny_chat_model),
        "tiny",
        GenerationDefaults(**DEFAULTS),
        reuse_kv=False,
    )
    history: list[api.ChatMessage] = []
    holders = set()
    for index, question in enumerate(QUESTIONS):
        history.append(api.ChatMessage(role=1, content=question))
        request = api.CompletionRequest(system_message=SYSTEM, history=history)
        if index == 1:  # the client cancels this turn after its first frame and keeps what it got
            call = stub.StreamComplete(request, timeout=TIMEOUT_S)
            first = next(iter(call))
            call.cancel()
            answer, worker = first.output_text, first.worker_id
        else:
            reply = stub.Complete(request, timeout=TIMEOUT_S)
            answer, worker = reply.output_text, reply.worker_id
            assert answer == fresh_answer(fresh, history)
        holders.add(worker)
        history.append(api.ChatMessage(role=2, content=answer))
        # Another conversation in between: the holder is never the least recently used worker.
        stub.Complete(
            api.CompletionRequest(history=[api.ChatMessage(role=1, content=f"Hi {index}")]), timeout=TIMEOUT_S
        )
    assert len(holders) == 1, holders

    def cached_counts() -> list[int]:
        lines = re.findall(
            r"done, (?:stop|length); prompt \d+ tokens.*; (\d+) prompt tokens from the KV cache",
            pool.supervisor.log(),
        )
        return [int(count) for count in lines]

    wait_until(lambda: len(cached_counts()) >= 2 * len(QUESTIONS) - 1, "the workers' completion lines")
    assert sum(1 for count in cached_counts() if count > 0) >= len(QUESTIONS) - 2
