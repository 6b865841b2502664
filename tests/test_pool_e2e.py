"""End to end: the whole service with the real numpy engine, as an operator starts it and a client uses it.

`python -m supervisor --config` starts the router and two numpy workers on loopback; the tests talk
real gRPC to it. Most use a tiny chat model the tests write themselves (tests/tiny_chat_model.py:
a byte-level BPE tokenizer with a ChatML template and a random Qwen2 that never picks an
end-of-sequence token greedily, so greedy answers run exactly to max_new_tokens). One test serves
the embedded default model (configs/default.yaml: builtin:smollm2) for a real chat answer.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from common.config import load_config
from protos import inference_pb2 as api
from tests.harness import (
    REPO,
    ConfigFile,
    Pool,
    ProcessSet,
    free_port,
    inference_stub,
    open_channel,
    registered_worker_ids,
    start_pool,
    wait_serving,
    wait_until,
    write_config,
)
from worker.core.engine import Engine, load_engine
from worker.core.request import ASSISTANT, USER, ChatRequest, SamplingParams, Turn
from worker.core.tokenizer import load_tokenizer

MODEL_NAME = "tiny-chat"
CONTEXT = 8192
DEFAULT_MAX_NEW_TOKENS = 24  # the tiny pool's configured default
LONG = 8000  # tokens: a greedy answer that streams for seconds, to be cancelled or cut
MAX_REQUEST_BYTES = 65536
SYSTEM = "You are a helpful assistant."
SEED_REQUEST = api.CompletionRequest(
    system_message=SYSTEM, history=[api.ChatMessage(role=USER, content="你好")]
)
TIMEOUT_S = 60  # per call; generous for a busy machine, never reached when things work


def ask(content: str, **params: Any) -> api.CompletionRequest:
    return api.CompletionRequest(
        system_message=SYSTEM, history=[api.ChatMessage(role=USER, content=content)], **params
    )


def greedy(content: str, max_new_tokens: int) -> api.CompletionRequest:
    return ask(content, temperature=0.0, max_new_tokens=max_new_tokens)


def stream(pool: Pool, request: api.CompletionRequest) -> list[api.Completion]:
    return list(inference_stub(pool.channel).StreamComplete(request, timeout=TIMEOUT_S))


def text_of(frames: list[api.Completion]) -> str:
    return "".join(frame.output_text for frame in frames)


def the_worker(frames: list[api.Completion]) -> str:
    """The one worker that served every frame of a stream."""
    (worker_id,) = {frame.worker_id for frame in frames}
    assert worker_id
    return worker_id


def pid_of(worker_id: str) -> int:
    """Pool workers are named HOST-devN-wINDEX-PID (worker/__main__.py)."""
    return int(worker_id.rsplit("-", 1)[1])


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def prompt_tokens(model: Path, history: tuple[Turn, ...]) -> int:
    tokenizer = load_tokenizer(model)
    return len(tokenizer.encode_prompt(tokenizer.chat_template.render(SYSTEM, history)))


# ---- pools


def tiny_pool_config(directory: Path, model: Path) -> ConfigFile:
    """Two numpy workers of the tiny model, with the harness's quick heartbeats and backoffs."""
    return write_config(
        directory,
        {
            "router": {"max_request_bytes": MAX_REQUEST_BYTES},
            "model": {
                "name": MODEL_NAME,
                "engine": "numpy",
                "path": str(model),
                "context_size": CONTEXT,
                # Greedy by default: with no end-of-sequence token ever picked, answers have known lengths.
                "defaults": {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": 0.0},
            },
            # A 1-core CI machine still runs the two workers (slowly); this 2-core one fits them.
            "workers": {"allow_cpu_oversubscription": True},
        },
    )


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path) -> Iterator[Pool]:
    """One tiny pool shared by the tests that leave it as they found it (all workers idle)."""
    directory = tmp_path_factory.mktemp("tiny-pool")
    with ProcessSet(directory) as procs:
        pool = start_pool(procs, tiny_pool_config(directory, tiny_chat_model))
        yield pool
        pool.channel.close()


# ---- the seed's request and the frame contract


def test_the_seed_request_streams_frames_as_the_contract_says(pool, tiny_chat_model):
    frames = stream(pool, SEED_REQUEST)

    assert len(frames) >= 2
    assert {frame.model_id for frame in frames} == {MODEL_NAME}
    assert [frame.finished for frame in frames] == [False] * (len(frames) - 1) + [True]
    assert [frame.finish_reason for frame in frames[:-1]] == [api.UNKNOWN] * (len(frames) - 1)
    # token_usage grows strictly from frame to frame, the final frame included: the last token's
    # text travels in the final frame.
    usage = [frame.token_usage for frame in frames]
    assert all(a < b for a, b in itertools.pairwise(usage)), usage
    assert usage[-1] == DEFAULT_MAX_NEW_TOKENS  # the configured default applies to an absent field
    assert frames[-1].finish_reason == api.LENGTH  # greedy never ends the tiny model's answers with EOS
    assert all(frame.create_time.seconds > 0 for frame in frames)
    times = [frame.create_time.ToNanoseconds() for frame in frames]
    assert times == sorted(times)
    expected_prompt = prompt_tokens(tiny_chat_model, (Turn(USER, "你好"),))
    assert {frame.prompt_tokens for frame in frames} == {expected_prompt}
    assert pid_of(the_worker(frames)) in {process.pid for process in pool.worker_processes()}
    assert text_of(frames)


def test_a_multi_turn_history_reaches_the_model_whole(pool, tiny_chat_model):
    history = (
        Turn(USER, "Tell me a story about a cat."),
        Turn(ASSISTANT, "Once upon a time there was a little cat."),
        Turn(USER, "And then?"),
    )
    request = api.CompletionRequest(
        system_message=SYSTEM,
        history=[api.ChatMessage(role=turn.role, content=turn.content) for turn in history],
        temperature=0.0,
        max_new_tokens=12,
    )
    frames = stream(pool, request)

    assert {frame.prompt_tokens for frame in frames} == {prompt_tokens(tiny_chat_model, history)}
    assert prompt_tokens(tiny_chat_model, history) > prompt_tokens(tiny_chat_model, history[-1:]) + 10
    assert frames[-1].finished and frames[-1].token_usage == 12
    assert text_of(frames) != text_of(stream(pool, greedy("And then?", 12)))  # the earlier turns mattered


def test_complete_equals_the_concatenated_stream(pool):
    request = greedy("Tell me a story about a cat and a dog.", 40)
    frames = stream(pool, request)
    completion = inference_stub(pool.channel).Complete(request, timeout=TIMEOUT_S)

    assert completion.output_text == text_of(frames) != ""
    assert completion.finished and completion.finish_reason == frames[-1].finish_reason == api.LENGTH
    assert completion.token_usage == frames[-1].token_usage == 40
    assert completion.prompt_tokens == frames[-1].prompt_tokens > 0
    assert completion.model_id == MODEL_NAME and completion.worker_id
    assert completion.create_time.seconds > 0


# ---- every generation parameter reaches the engine: the pool's answer is the engine's own answer
# with that parameter (run here in the test, from the pool's config), and not its answer without it


@pytest.fixture(scope="module")
def engine(pool: Pool) -> Engine:
    """The engine a pool worker runs (same model, same configured defaults), in the test process."""
    return load_engine(load_config(pool.config.path).model, device_id=0)


QUESTION = "Tell me a story about a cat."


def engine_text(engine: Engine, **params: Any) -> str:
    request = ChatRequest(SYSTEM, (Turn(USER, QUESTION),), SamplingParams(**params))
    return "".join(chunk.text for chunk in engine.generate(request, threading.Event()))


SAMPLED = {"temperature": 1.0, "seed": 7}
# The parameter under test, and what the same request is without it (or with another value).
PARAMETERS = {
    "temperature and seed": ({"temperature": 1.5, "seed": 11}, {"seed": 11}),
    "seed": ({"temperature": 1.5, "seed": 11}, {"temperature": 1.5, "seed": 12}),
    "top_k": ({**SAMPLED, "top_p": 1.0, "top_k": 1}, {**SAMPLED, "top_p": 1.0}),
    "top_p": ({**SAMPLED, "top_k": 0, "top_p": 0.05}, {**SAMPLED, "top_k": 0}),
    "repetition_penalty": ({"repetition_penalty": 3.0}, {}),
    "max_new_tokens": ({"max_new_tokens": 5}, {}),
}


@pytest.mark.parametrize("name", PARAMETERS, ids=list(PARAMETERS))
def test_each_generation_parameter_reaches_the_engine(pool, engine, name):
    params, without = PARAMETERS[name]
    frames = stream(pool, ask(QUESTION, **params))
    expected = engine_text(engine, **params)
    assert expected != engine_text(engine, **without), f"{name} makes no difference to this request"
    assert text_of(frames) == expected, f"the pool's answer is not the engine's answer with {name}"
    assert frames[-1].token_usage == params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)


def test_stop_strings_reach_the_engine_and_cut_the_answer(pool, engine):
    full = engine_text(engine)
    stop = full[len(full) // 2 :][:3]  # three characters from the middle of the greedy answer
    assert stop.strip() and full.index(stop) > 0, full
    frames = stream(pool, ask(QUESTION, stop=["never appears 🙂", stop]))
    assert text_of(frames) == engine_text(engine, stop=(stop,)) == full[: full.index(stop)]
    assert frames[-1].finish_reason == api.STOP
    assert frames[-1].token_usage < DEFAULT_MAX_NEW_TOKENS


# ---- every invalid input class: INVALID_ARGUMENT naming the problem


def with_history(*turns: tuple[int, str], **params: Any) -> api.CompletionRequest:
    history = [api.ChatMessage(role=role, content=content) for role, content in turns]
    return api.CompletionRequest(system_message=SYSTEM, history=history, **params)


HI = (USER, "hi")
INVALID = {
    "empty history": (with_history(), "history is empty"),
    "last turn from the assistant": (
        with_history(HI, (ASSISTANT, "hello")),
        "last turn of history must be from the user",
    ),
    "unknown role": (with_history((3, "hi")), r"history\[0\]\.role is 3, an unknown role"),
    "role 0": (with_history(HI, (0, "x"), HI), r"history\[1\]\.role is 0, an unknown role"),
    "empty content": (with_history(HI, (ASSISTANT, ""), HI), r"history\[1\]\.content is empty"),
    "blank content": (with_history((USER, " \n\t")), r"history\[0\]\.content is empty"),
    "max_new_tokens 0": (with_history(HI, max_new_tokens=0), "max_new_tokens is 0"),
    "max_new_tokens past the context": (
        with_history(HI, max_new_tokens=CONTEXT + 1),
        rf"max_new_tokens is {CONTEXT + 1}, it must be in 1\.\.{CONTEXT}",
    ),
    "negative temperature": (with_history(HI, temperature=-0.5), "temperature is -0.5"),
    "huge temperature": (with_history(HI, temperature=7.0), "temperature is 7"),
    "NaN temperature": (with_history(HI, temperature=math.nan), "temperature is nan"),
    "top_p 0": (with_history(HI, top_p=0.0), r"top_p is 0\.0, it must be in \(0, 1\]"),
    "top_p above 1": (with_history(HI, top_p=1.5), "top_p is 1.5"),
    "repetition_penalty 0": (with_history(HI, repetition_penalty=0.0), "repetition_penalty is 0"),
    "huge repetition_penalty": (with_history(HI, repetition_penalty=50.0), "repetition_penalty is 50"),
    "empty stop string": (with_history(HI, stop=["end", ""]), r"stop\[1\] is empty"),
    "too many stop strings": (with_history(HI, stop=[f"s{i}" for i in range(9)]), "stop has 9 strings"),
    "request too large": (
        with_history((USER, "a" * MAX_REQUEST_BYTES)),
        rf"request too large: \d+ bytes, the limit is {MAX_REQUEST_BYTES} bytes",
    ),
    # Small in bytes, too long in tokens: refused by the worker, which tokenizes (each emoji is 4 tokens).
    "last user turn longer than the context": (
        with_history((USER, "🙂" * (CONTEXT // 2))),
        rf"exceeds the model's context of {CONTEXT} tokens",
    ),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_invalid_input_is_refused_naming_the_problem(pool, case):
    request, message = INVALID[case]
    stub = inference_stub(pool.channel)
    for call in (
        lambda: list(stub.StreamComplete(request, timeout=TIMEOUT_S)),
        lambda: stub.Complete(request, timeout=TIMEOUT_S),
    ):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert re.search(message, error.details()), error.details()


# ---- concurrency, cancellation


def test_more_concurrent_streams_than_workers_all_complete_one_at_a_time_per_worker(pool):
    requests = [greedy(f"Question {i}: tell me about the number {i}.", 120 + 20 * i) for i in range(5)]
    with ThreadPoolExecutor(len(requests)) as clients:
        concurrent = list(clients.map(lambda request: stream(pool, request), requests))
    alone = [stream(pool, request) for request in requests]

    windows: dict[str, list[tuple[int, int]]] = {}
    for request, frames, reference in zip(requests, concurrent, alone, strict=True):
        assert frames[-1].finished and frames[-1].token_usage == request.max_new_tokens
        assert text_of(frames) == text_of(reference)  # no cross-talk, no shared KV cache
        first, last = frames[0].create_time.ToNanoseconds(), frames[-1].create_time.ToNanoseconds()
        windows.setdefault(the_worker(frames), []).append((first, last))
    assert len(windows) == 2  # both workers served
    for worker_id, spans in windows.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end < start, f"{worker_id} served two requests at once: {spans}"
    assert "refused, busy" not in pool.supervisor.log()


def cancelled_on(pool: Pool, worker_id: str) -> int:
    pattern = rf"worker {re.escape(worker_id)}: request \S+: done, cancelled"
    return len(re.findall(pattern, pool.supervisor.log()))


def test_cancel_mid_stream_frees_the_worker(pool):
    stub = inference_stub(pool.channel)
    to_cancel = stub.StreamComplete(greedy("A very long story, please.", LONG), timeout=TIMEOUT_S)
    freed = next(to_cancel).worker_id
    busy = stub.StreamComplete(greedy("Another very long story.", LONG), timeout=TIMEOUT_S)
    other = next(busy).worker_id
    assert other != freed  # both workers are busy now
    cancelled_before = {worker: cancelled_on(pool, worker) for worker in (freed, other)}

    to_cancel.cancel()
    wait_until(lambda: cancelled_on(pool, freed) > cancelled_before[freed], f"{freed} to log the cancel")
    # The other worker is still on its long answer: only the freed one can take this request.
    follow_up = stream(pool, greedy("A short one.", 8))
    busy.cancel()
    wait_until(lambda: cancelled_on(pool, other) > cancelled_before[other], f"{other} to log the cancel")

    assert the_worker(follow_up) == freed
    assert follow_up[-1].finished and follow_up[-1].token_usage == 8
    assert to_cancel.code() == grpc.StatusCode.CANCELLED


# ---- a worker killed mid-stream (its own pool: the test restarts a worker)


def test_a_worker_killed_mid_stream_fails_its_stream_and_is_restarted(tmp_path, tiny_chat_model):
    with ProcessSet(tmp_path) as procs:
        pool = start_pool(procs, tiny_pool_config(tmp_path, tiny_chat_model))
        registered_before = registered_worker_ids(pool.supervisor)
        stub = inference_stub(pool.channel)
        doomed = stub.StreamComplete(greedy("A very long story, please.", LONG), timeout=TIMEOUT_S)
        victim = next(doomed).worker_id
        survivor = (registered_before - {victim}).pop()
        victim_pid = pid_of(victim)
        assert victim_pid in {process.pid for process in pool.worker_processes()}

        os.kill(victim_pid, signal.SIGKILL)
        error = rpc_error(lambda: list(doomed))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert victim in error.details()

        assert the_worker(stream(pool, greedy("Still there?", 8))) == survivor  # the pool keeps serving
        pool.supervisor.wait_for_log(rf"\(pid {victim_pid}\) was killed by SIGKILL")
        restarted = wait_until(
            lambda: registered_worker_ids(pool.supervisor) - registered_before, "the restarted worker"
        )
        (newcomer,) = restarted
        assert pid_of(newcomer) != victim_pid
        # Both live workers serve: while one long answer holds a worker, another goes to the other one.
        first = stub.StreamComplete(greedy("one", LONG), timeout=TIMEOUT_S)
        second = stub.StreamComplete(greedy("two", LONG), timeout=TIMEOUT_S)
        assert {next(first).worker_id, next(second).worker_id} == {survivor, newcomer}
        first.cancel()
        second.cancel()
        pool.channel.close()


# ---- the embedded default model (configs/default.yaml), kept short: each worker loads in 5-15 s


MODEL_LOAD_S = 120.0  # both workers load SmolLM2 at once; 5-15 s each, more on a busy machine


def default_model_config(directory: Path) -> ConfigFile:
    """configs/default.yaml as shipped, on free loopback ports."""
    raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text(encoding="utf-8"))
    grpc_port, zmq_port = free_port(), free_port()
    raw["router"].update(listen=f"127.0.0.1:{grpc_port}", zmq_bind=f"tcp://127.0.0.1:{zmq_port}")
    raw["http"]["listen"] = f"127.0.0.1:{free_port()}"  # not the shipped 8000: another pool may hold it
    raw["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    raw["workers"]["allow_cpu_oversubscription"] = True
    path = directory / "default.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return ConfigFile(path, raw["router"]["listen"], raw["router"]["zmq_bind"], raw)


@pytest.mark.slow
def test_the_default_model_answers_the_seed_request(tmp_path):
    with ProcessSet(tmp_path) as procs:
        config = default_model_config(tmp_path)
        assert config.raw["model"]["path"] == "builtin:smollm2" and config.raw["workers"]["devices"] == [0, 1]
        supervisor = procs.start("supervisor", ["-m", "supervisor", "--config", str(config.path)])
        wait_serving(config.grpc_address, supervisor, MODEL_LOAD_S)  # SERVING = the first worker loaded
        wait_until(lambda: len(registered_worker_ids(supervisor)) == 2, "2 workers loaded", MODEL_LOAD_S)
        pool = Pool(supervisor, config, open_channel(config.grpc_address))
        seed_greedy = api.CompletionRequest()
        seed_greedy.CopyFrom(SEED_REQUEST)
        seed_greedy.temperature, seed_greedy.max_new_tokens = 0.0, 8
        seeded = ask("Write a short poem about the sea.", temperature=0.9, seed=1234, max_new_tokens=8)

        with ThreadPoolExecutor(3) as clients:
            answer, *sampled = clients.map(lambda r: stream(pool, r), [seed_greedy, seeded, seeded])

        assert text_of(answer).strip()
        assert {frame.model_id for frame in answer} == {"smollm2-135m-instruct"}
        assert answer[-1].finished and 1 <= answer[-1].token_usage <= 8
        assert text_of(sampled[0]) == text_of(sampled[1]) != ""  # same seed, same output
        pool.channel.close()
