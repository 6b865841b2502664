"""Cache-aware dispatch against real processes: a supervisor, the router and three paced workers
(echo answers, prefill cost and KV reuse modelled) on loopback, real gRPC and ZeroMQ.

- a conversation's next turn goes to the worker holding it, though LRU would pick another;
- with its holder busy, a turn goes to another idle worker at once (and is prefilled from 0);
- x-session-id pins a conversation even when its text gives no match;
- a hot conversation flooding the pool is spread over every worker and others still get served;
- with router.cache_aware false, the same turns rotate over the workers (least recently used);
- saturated, the pool never has a worker idle while a request waits (the router's own gauges).
"""

from __future__ import annotations

import re
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
from prometheus_client.parser import text_string_to_metric_families

from protos import inference_pb2 as api
from tests.harness import Pool, free_port, inference_stub, start_pool, wait_until, write_config

USER, ASSISTANT = 1, 2
SYSTEM = "You are a helpful assistant."
TIMEOUT_S = 60
ANSWER = 6  # tokens
PACED = {
    "echo": True,
    "tokens_per_second": 50.0,
    "first_token_delay_s": 0.0,
    "tokens_per_request": 100000,  # answers end at max_new_tokens: ANSWER unless a test wants longer
    "prefill_tokens_per_second": 20000.0,
}


def start(procs, tmp_path, cache_aware: bool = True, metrics_port: int | None = None) -> Pool:
    metrics = {"metrics_listen": f"127.0.0.1:{metrics_port}"} if metrics_port else {}
    config = write_config(
        tmp_path,
        {
            "router": {"cache_aware": cache_aware, **metrics},
            "model": {"context_size": 4096, "paced": PACED},
            "workers": {"devices": [0, 1, 2]},
        },
    )
    return start_pool(procs, config)


def request(*contents: str, system: str = SYSTEM, **params) -> api.CompletionRequest:
    history = [
        api.ChatMessage(role=USER if index % 2 == 0 else ASSISTANT, content=content)
        for index, content in enumerate(contents)
    ]
    params.setdefault("max_new_tokens", ANSWER)
    return api.CompletionRequest(system_message=system, history=history, **params)


def complete(pool: Pool, message: api.CompletionRequest, session: str = "") -> api.Completion:
    metadata = (("x-session-id", session),) if session else None
    return inference_stub(pool.channel).Complete(message, timeout=TIMEOUT_S, metadata=metadata)


def converse(pool: Pool, questions: list[str], other: str) -> list[tuple[str, str]]:
    """Run a conversation, with one unrelated request between its turns (so that the conversation's
    worker is never the least recently used one); the (worker, other request's worker) per turn."""
    turns: list[str] = []
    served = []
    for question in questions:
        turns.append(question)
        answer = complete(pool, request(*turns))
        turns.append(answer.output_text)
        between = complete(pool, request(f"{other} {question}", system="another system prompt"))
        served.append((answer.worker_id, between.worker_id))
    return served


def cached_tokens_logged(pool: Pool) -> list[int]:
    return [int(n) for n in re.findall(r"(\d+) prompt tokens from the KV cache", pool.supervisor.log())]


QUESTIONS = ["tell me about cats", "and about their whiskers", "why do they purr", "what do they eat"]


def test_the_next_turn_goes_to_the_worker_holding_the_conversation(procs, tmp_path):
    pool = start(procs, tmp_path)
    served = converse(pool, QUESTIONS, "unrelated")
    holders = {conversation for conversation, _ in served}
    assert len(holders) == 1, served
    # Every later turn found its prefix in the cache: the router's per-call lines say so.
    wait_until(lambda: len(cached_tokens_logged(pool)) >= 2 * 2 * len(QUESTIONS), "call log lines")
    assert sum(1 for count in cached_tokens_logged(pool) if count > 0) >= 2 * (len(QUESTIONS) - 1)


def test_without_cache_awareness_the_turns_rotate_over_the_workers(procs, tmp_path):
    pool = start(procs, tmp_path, cache_aware=False)
    served = converse(pool, QUESTIONS, "unrelated")
    assert len({conversation for conversation, _ in served}) > 1, served


def test_with_its_holder_busy_a_turn_goes_to_another_idle_worker_at_once(procs, tmp_path):
    pool = start(procs, tmp_path)
    first = complete(pool, request(QUESTIONS[0]))
    # The holder gets a turn 2 that streams for minutes, then the same turn 2 comes again.
    endless = inference_stub(pool.channel).StreamComplete(
        request(QUESTIONS[0], first.output_text, QUESTIONS[1], max_new_tokens=4000), timeout=TIMEOUT_S
    )
    frames = iter(endless)
    try:
        assert next(frames).worker_id == first.worker_id
        again = complete(pool, request(QUESTIONS[0], first.output_text, QUESTIONS[1]))
        assert again.worker_id != first.worker_id
        assert not next(frames).finished, "the holder's stream is still running: nobody waited for it"
    finally:
        endless.cancel()


def test_a_session_id_pins_a_conversation_whose_text_does_not_match(procs, tmp_path):
    pool = start(procs, tmp_path)
    workers = []
    for index in range(3):
        # A different system prompt every time: no prefix in common, only the session.
        workers.append(complete(pool, request(f"turn {index}", system=f"prompt {index}"), "chat-7").worker_id)
        complete(pool, request("filler", system="filler"))
    assert len(set(workers)) == 1, workers


def test_a_hot_conversation_does_not_take_the_pool_for_itself(procs, tmp_path):
    pool = start(procs, tmp_path)
    first = complete(pool, request(QUESTIONS[0]))
    hot = request(QUESTIONS[0], first.output_text, QUESTIONS[1], max_new_tokens=12)
    with ThreadPoolExecutor(12) as executor:
        futures = [executor.submit(complete, pool, hot) for _ in range(9)]
        futures += [executor.submit(complete, pool, request(f"cold {i}")) for i in range(3)]
        results = [future.result() for future in futures]
    assert all(result.finished for result in results), "every request was served"
    assert len({result.worker_id for result in results[:9]}) >= 2, "the hot conversation spread out"


def router_gauges(port: int) -> tuple[int, int]:
    """(requests queued, workers idle) as the router reports them, read on its event loop."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    queued = idle = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bm_pool_queue_length":
                queued = int(sample.value)
            elif sample.name == "bm_pool_worker_state" and sample.labels["state"] == "idle":
                idle += int(sample.value)
    return queued, idle


def test_saturated_no_worker_idles_while_a_request_waits(procs, tmp_path):
    port = free_port()
    pool = start(procs, tmp_path, metrics_port=port)
    first = complete(pool, request(QUESTIONS[0]))
    hot = request(QUESTIONS[0], first.output_text, QUESTIONS[1], max_new_tokens=25)
    samples: list[tuple[int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(router_gauges(port))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(12) as executor:
            calls = [executor.submit(complete, pool, hot) for _ in range(8)]
            calls += [
                executor.submit(complete, pool, request(f"cold {i}", max_new_tokens=25)) for i in range(4)
            ]
            assert all(call.result().finished for call in calls)
    finally:
        done.set()
        sampler.join()
    assert any(queued for queued, _ in samples), "the pool was never saturated: the check proves nothing"
    assert not [(queued, idle) for queued, idle in samples if queued and idle]


def test_a_bad_session_id_is_refused(procs, tmp_path):
    pool = start(procs, tmp_path)
    try:
        complete(pool, request("hi"), "x" * 200)
    except grpc.RpcError as error:
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "x-session-id" in error.details()
    else:
        raise AssertionError("a 200-character session id was accepted")
