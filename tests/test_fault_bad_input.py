"""Fault: bad input. Hypothesis throws random requests at the live pool (real router and workers):
any roles, empty, whitespace and huge content, unicode edge cases, parameters in and out of range,
NaN and infinities. Each request must end as an independent oracle says: a complete stream with
exactly the echoed text, or INVALID_ARGUMENT with a message, or, beyond the gRPC message limit,
RESOURCE_EXHAUSTED from the gRPC layer. The pool stays up and healthy throughout.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protos import inference_pb2 as api
from tests.fault_clients import Outcome, assert_complete, start_echo_pool, unique_prompt
from tests.harness import Pool, ProcessSet, health_status, inference_stub
from worker.core.paced import estimate_prompt_tokens
from worker.core.request import ChatRequest, Turn

MAX_REQUEST_BYTES = 32 << 10
GRPC_LIMIT_BYTES = MAX_REQUEST_BYTES + (64 << 10)  # router.server.GRPC_MESSAGE_HEADROOM_BYTES above it
CONTEXT = 2048
TOKENS_PER_REQUEST = 4
DEFAULT_MAX_NEW_TOKENS = 256
EXAMPLES = 400  # each example is a batch of 1-10 concurrent requests: ~2000 requests in all

EDGE_TEXTS = [
    "", " ", "\t\r\n", "\u3000", "\u2028", "\x85", "\x1c\x1d\x1e\x1f", "\u200b", "\ufeff", "\x00",
    "a\u0301", "🙂", "👩\u200d👩\u200d👧", "\U0010ffff", "\ud7ff", "\u202eRTL", "你好", "NaN", "\\u0000",
]  # fmt: skip


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    directory: Path = tmp_path_factory.mktemp("bad-input")
    with ProcessSet(directory) as procs:
        pool = start_echo_pool(
            procs,
            directory,
            router={"max_request_bytes": MAX_REQUEST_BYTES},
            model={"context_size": CONTEXT, "defaults": {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS}},
            tokens_per_second=2000.0,
            first_token_delay_s=0.0,
            tokens_per_request=TOKENS_PER_REQUEST,
        )
        pool.pids = {process.pid for process in [pool.router_process(), *pool.worker_processes()]}
        yield pool


# ---- the oracle: what the pool must answer, from the rules in the API docs


def verdict(request: api.CompletionRequest) -> str:
    """ "too large" (gRPC layer), "invalid" (INVALID_ARGUMENT) or "ok"."""
    size = request.ByteSize()
    if size > GRPC_LIMIT_BYTES:
        return "too large"
    history = request.history
    roles_ok = all(turn.role in (1, 2) for turn in history)
    contents_ok = all(turn.content.strip() for turn in history)
    if size > MAX_REQUEST_BYTES or not history or not roles_ok or not contents_ok or history[-1].role != 1:
        return "invalid"
    if not params_ok(request) or prompt_tokens(request) >= CONTEXT:
        return "invalid"
    return "ok"


def params_ok(request: api.CompletionRequest) -> bool:
    def within(name: str, low: float, high: float, *, open_low: bool = False) -> bool:
        if not request.HasField(name):
            return True
        value = getattr(request, name)
        return not math.isnan(value) and (low < value if open_low else low <= value) and value <= high

    stops_ok = len(request.stop) <= 8 and all(0 < len(stop) <= 256 for stop in request.stop)
    return (
        within("max_new_tokens", 1, CONTEXT)
        and within("temperature", 0.0, 2.0)
        and within("top_p", 0.0, 1.0, open_low=True)
        and within("repetition_penalty", 0.0, 10.0, open_low=True)
        and stops_ok
    )


def prompt_tokens(request: api.CompletionRequest) -> int:
    turns = tuple(Turn(turn.role, turn.content) for turn in request.history)
    return estimate_prompt_tokens(ChatRequest(request.system_message, turns))


def expected_tokens(request: api.CompletionRequest) -> int:
    asked = request.max_new_tokens if request.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
    return min(TOKENS_PER_REQUEST, asked, CONTEXT - prompt_tokens(request))


# ---- strategies

texts = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=24),
    st.sampled_from(EDGE_TEXTS),
    st.builds(
        lambda piece, count: piece * count, st.sampled_from(["x", "你", "🙂", "ab "]), st.integers(1, 40_000)
    ),
)
roles = st.one_of(st.sampled_from([1, 2]), st.integers(-(2**31), 2**31 - 1))
turns = st.builds(lambda role, content: api.ChatMessage(role=role, content=content), roles, texts)
user_turn = st.builds(lambda content: api.ChatMessage(role=1, content=content), texts)
histories = st.one_of(
    st.lists(turns, max_size=4),
    st.builds(lambda earlier, last: [*earlier, last], st.lists(turns, max_size=3), user_turn),
)
floats = st.floats(width=32)
params = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.one_of(st.integers(0, 2**32 - 1), st.integers(1, 8)),
        "temperature": st.one_of(floats, st.floats(0, 2, width=32)),
        "top_p": st.one_of(floats, st.floats(0.125, 1, width=32)),
        "top_k": st.integers(0, 2**32 - 1),
        "repetition_penalty": st.one_of(floats, st.floats(0.5, 2, width=32)),
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.lists(st.one_of(st.text(max_size=4), st.just("s" * 300)), max_size=10),
    },
)
chaotic_requests = st.builds(
    lambda system, history, extra: api.CompletionRequest(system_message=system, history=history, **extra),
    st.one_of(st.just("You are a helpful assistant."), texts),
    histories,
    params,
)
# Requests within every rule, so that many streams complete, with any unicode in them.
words = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24).filter(str.strip)
valid_params = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.integers(1, 2 * TOKENS_PER_REQUEST),
        "temperature": st.floats(0, 2, width=32),
        "top_p": st.floats(0.125, 1, width=32),
        "top_k": st.integers(0, 2**32 - 1),
        "repetition_penalty": st.floats(0.5, 2, width=32),
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.lists(words, max_size=8),
    },
)
valid_requests = st.builds(
    lambda system, earlier, last, extra: api.CompletionRequest(
        system_message=system, history=[*earlier, api.ChatMessage(role=1, content=last)], **extra
    ),
    st.text(max_size=24),
    st.lists(
        st.builds(
            lambda role, content: api.ChatMessage(role=role, content=content), st.sampled_from([1, 2]), words
        ),
        max_size=3,
    ),
    words,
    valid_params,
)
requests = st.one_of(valid_requests, chaotic_requests)


# ---- checks


def call(stub: Any, request: api.CompletionRequest) -> Outcome:
    last = request.history[-1].content if request.history else ""
    outcome = Outcome(last)
    try:
        outcome.frames = list(stub.StreamComplete(request, timeout=60))
        outcome.code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        outcome.code, outcome.details = error.code(), error.details() or ""
    return outcome


def check(request: api.CompletionRequest, outcome: Outcome) -> None:
    expected = verdict(request)
    event(expected)  # shown by --hypothesis-show-statistics
    if expected == "too large":
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome.describe()
        assert "Received message larger than max" in outcome.details
    elif expected == "invalid":
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.describe()
        assert outcome.details and not outcome.frames
    else:
        assert_complete(outcome)
        assert outcome.frames[-1].token_usage == expected_tokens(request), outcome.describe()
        reason = api.STOP if expected_tokens(request) == TOKENS_PER_REQUEST else api.LENGTH
        assert outcome.frames[-1].finish_reason == reason


@pytest.fixture(scope="module")
def threads():
    with ThreadPoolExecutor(8) as executor:
        yield executor


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same requests on every run: CI stays reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(requests, min_size=1, max_size=10))
def test_random_requests_end_in_a_complete_stream_or_invalid_argument(pool: Pool, threads, batch):
    stub = inference_stub(pool.channel)
    for request, outcome in zip(batch, threads.map(lambda r: call(stub, r), batch), strict=True):
        check(request, outcome)


def test_undecodable_requests_get_invalid_argument(pool: Pool):
    method = pool.channel.unary_stream(
        "/InferenceService/StreamComplete",
        request_serializer=lambda raw: raw,
        response_deserializer=api.Completion.FromString,
    )
    valid = api.CompletionRequest(history=[api.ChatMessage(role=1, content="fine")]).SerializeToString()
    for raw in (valid.replace(b"fine", b"\xff\xfe\xfd\xfc"), b"\xff\xff\xff\x01", b"\x0a\x05\x08"):
        with pytest.raises(grpc.RpcError) as caught:
            list(method(raw, timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "not a valid CompletionRequest" in caught.value.details()


def test_the_pool_is_healthy_after_the_bad_input(pool: Pool):
    assert health_status(pool.config.grpc_address) == health_pb2.HealthCheckResponse.SERVING
    assert {process.pid for process in [pool.router_process(), *pool.worker_processes()]} == pool.pids
    stub = inference_stub(pool.channel)
    for prompt in [unique_prompt("healthy") for _ in range(4)]:
        outcome = call(stub, api.CompletionRequest(history=[api.ChatMessage(role=1, content=prompt)]))
        assert_complete(outcome)
    assert "Traceback" not in pool.supervisor.log()
