"""Request validation: every rule, checked directly and through the live gRPC service."""

from __future__ import annotations

import math

import grpc
import pytest

from protos import inference_pb2
from router.validation import RequestLimits, ValidationError, parse_request, validate
from tests.router_harness import async_test, expect_status, read_all, running_router, workers

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
LIMITS = RequestLimits(max_request_bytes=4096, max_new_tokens=512)


def make(history: list[tuple[int, str]] | None = None, **params: object) -> inference_pb2.CompletionRequest:
    turns = [(1, "hi")] if history is None else history
    return inference_pb2.CompletionRequest(
        system_message="sys",
        history=[inference_pb2.ChatMessage(role=role, content=content) for role, content in turns],
        **params,
    )


INVALID = [
    ("empty history", make([]), "history is empty"),
    (
        "last turn from the assistant",
        make([(1, "hi"), (2, "hello")]),
        "last turn of history must be from the user",
    ),
    ("unknown role", make([(3, "hi"), (1, "x")]), "history[0].role is 3, an unknown role"),
    ("negative role", make([(1, "x"), (-1, "y"), (1, "z")]), "history[1].role is -1"),
    ("empty content", make([(1, "hi"), (2, ""), (1, "x")]), "history[1].content is empty"),
    ("whitespace content", make([(1, " \n\t")]), "history[0].content is empty"),
    ("temperature too high", make(temperature=2.5), "temperature is 2.5, it must be in [0, 2]"),
    ("negative temperature", make(temperature=-0.1), "temperature is"),
    ("NaN temperature", make(temperature=math.nan), "temperature is nan"),
    ("top_p zero", make(top_p=0.0), "top_p is 0.0, it must be in (0, 1]"),
    ("top_p above one", make(top_p=1.5), "top_p is 1.5"),
    (
        "repetition_penalty zero",
        make(repetition_penalty=0.0),
        "repetition_penalty is 0.0, it must be in (0, 10]",
    ),
    ("repetition_penalty too high", make(repetition_penalty=11.0), "repetition_penalty is 11.0"),
    ("max_new_tokens zero", make(max_new_tokens=0), "max_new_tokens is 0, it must be in 1..512"),
    ("max_new_tokens over the cap", make(max_new_tokens=513), "max_new_tokens is 513"),
    ("too many stop strings", make(stop=[str(n) for n in range(9)]), "stop has 9 strings, at most 8"),
    ("empty stop string", make(stop=["ok", ""]), "stop[1] is empty"),
    ("long stop string", make(stop=["x" * 257]), "stop[0] has 257 characters, at most 256"),
    ("request too large", make([(1, "x" * 5000)]), "request too large"),
]


@pytest.mark.parametrize(("case", "request_", "message"), INVALID, ids=[case for case, _, _ in INVALID])
def test_an_invalid_request_is_refused_with_a_message_naming_the_problem(case, request_, message):
    with pytest.raises(ValidationError) as refused:
        validate(request_, LIMITS)
    assert message in str(refused.value), case


def test_the_limits_themselves_are_accepted():
    request_ = make(
        [(1, "a"), (2, "b"), (1, "c")],
        temperature=2.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=10.0,
        max_new_tokens=512,
        seed=2**64 - 1,
        stop=["s" * 256] * 8,
    )
    generate = validate(request_, LIMITS)
    assert [(turn.role, turn.content) for turn in generate.history] == [(1, "a"), (2, "b"), (1, "c")]
    assert generate.system_message == "sys"
    params = generate.params
    assert (params.temperature, params.top_p, params.top_k) == (2.0, 1.0, 0)
    assert (params.repetition_penalty, params.max_new_tokens, params.seed) == (10.0, 512, 2**64 - 1)
    assert list(params.stop) == ["s" * 256] * 8
    assert generate.request_id == ""


def test_the_messages_name_the_problem_exactly():
    refusals = [
        (make([]), "history is empty: it needs at least one user turn (role 1)"),
        (
            make([(1, "a"), (2, "b"), (2, "c")]),
            "the last turn of history must be from the user (role 1), "
            "history[2] is from the assistant (role 2)",
        ),
        (
            parse_request(b"\x0a\x02\xff\xfe"),
            "the request is not a valid CompletionRequest: "
            "Error parsing message with type 'CompletionRequest': String field had bad UTF-8",
        ),
    ]
    for request_, message in refusals:
        with pytest.raises(ValidationError) as refused:
            validate(request_, LIMITS)
        assert str(refused.value) == message


def test_the_lower_limits_and_the_exact_size_limit_are_accepted():
    generate = validate(make(max_new_tokens=1, repetition_penalty=0.01, top_p=1e-6, temperature=0.0), LIMITS)
    assert (generate.params.max_new_tokens, generate.params.repetition_penalty) == (1, pytest.approx(0.01))
    at_limit = make([(1, "x")])
    while at_limit.ByteSize() < LIMITS.max_request_bytes:
        at_limit.history[0].content += "x"
    assert at_limit.ByteSize() == LIMITS.max_request_bytes
    assert validate(at_limit, LIMITS).history[0].content == at_limit.history[0].content
    over = make([(1, at_limit.history[0].content + "x")])
    with pytest.raises(ValidationError, match=f"request too large: {LIMITS.max_request_bytes + 1} bytes"):
        validate(over, LIMITS)


def test_parse_request_never_raises():
    assert parse_request(make().SerializeToString()) == make()
    assert "Wire format was corrupt" in parse_request(b"\x12\x02\x08").problem


def test_the_stop_string_limit_counts_characters_not_bytes():
    three_bytes_each = "停" * 256  # 768 bytes of UTF-8, 256 characters: allowed
    assert list(validate(make(stop=[three_bytes_each]), LIMITS).params.stop) == [three_bytes_each]
    with pytest.raises(ValidationError, match=r"stop\[0\] has 257 characters"):
        validate(make(stop=["停" * 257]), LIMITS)


def test_greedy_temperature_zero_stays_distinct_from_an_absent_temperature():
    assert validate(make(temperature=0.0), LIMITS).params.HasField("temperature")
    absent = validate(make(), LIMITS).params
    assert not any(
        absent.HasField(name) for name in ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
    )


@async_test
async def test_every_invalid_request_gets_invalid_argument_from_the_live_service():
    router_under_test = running_router(max_new_tokens=512, max_request_bytes=4096)
    async with router_under_test as router, workers(router.endpoint, "w1") as (worker,):
        for case, request_, message in INVALID:
            details = await expect_status(read_all(router.stub.StreamComplete(request_)), INVALID_ARGUMENT)
            assert message in details, case
            details = await expect_status(router.stub.Complete(request_), INVALID_ARGUMENT)
            assert message in details, case
        assert worker.pending("generate") == 0
        snapshot = router.server.snapshot()
        assert (snapshot.queued, snapshot.running, snapshot.open_calls) == (0, 0, 0)


@async_test
async def test_a_message_over_the_grpc_hard_limit_is_cut_off_and_the_service_goes_on():
    async with running_router(max_request_bytes=4096) as router:
        huge = make([(1, "x" * (200 << 10))])
        await expect_status(router.stub.Complete(huge), grpc.StatusCode.RESOURCE_EXHAUSTED)
        details = await expect_status(router.stub.Complete(make([(1, "")])), INVALID_ARGUMENT)
        assert "content is empty" in details
