"""OpenAI request bodies to internal Generate messages (router/http/openai_requests.py), and the
http config section."""

from __future__ import annotations

import re
from typing import Any

import grpc
import pytest

from common.config import ConfigError, HttpConfig, load_config
from router.http.errors import ApiError
from router.http.openai_requests import Endpoint, OpenAIRequest, parse
from router.validation import RequestLimits

LIMITS = RequestLimits(max_request_bytes=1 << 16, max_new_tokens=256)


def chat(**body: Any) -> OpenAIRequest:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse(body, Endpoint.CHAT, LIMITS, max_n=4)


def refusal(endpoint: Endpoint = Endpoint.CHAT, **body: Any) -> ApiError:
    if endpoint is Endpoint.CHAT:
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    with pytest.raises(ApiError) as raised:
        parse(body, endpoint, LIMITS, max_n=4)
    assert raised.value.outcome == grpc.StatusCode.INVALID_ARGUMENT and raised.value.answer.status == 400
    return raised.value


def test_system_messages_are_joined_and_text_parts_concatenated() -> None:
    request = chat(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Bonjour"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Capital "}, {"type": "text", "text": "of Peru?"}],
            },
        ]
    )
    (generation,) = request.generations
    generate = generation.generate
    assert generate.system_message == "Be brief.\n\nAnswer in French."
    assert [(turn.role, turn.content) for turn in generate.history] == [
        (1, "Hi"),
        (2, "Bonjour"),
        (1, "Capital of Peru?"),
    ]
    assert not generate.HasField("raw_prompt")


def test_absent_parameters_stay_absent_and_given_ones_are_mapped() -> None:
    assert not chat().generations[0].generate.params.HasField("temperature")
    params = (
        chat(
            max_completion_tokens=9,
            temperature=0.5,
            top_p=0.8,
            top_k=-1,
            repetition_penalty=1.2,
            seed=3,
            stop="END",
        )
        .generations[0]
        .generate.params
    )
    assert (params.max_new_tokens, params.top_k, params.seed, list(params.stop)) == (9, 0, 3, ["END"])
    assert params.temperature == pytest.approx(0.5) and params.repetition_penalty == pytest.approx(1.2)


def test_n_choices_get_consecutive_seeds_and_usage_counts_each_prompt_once() -> None:
    request = chat(n=3, seed=10)
    assert [g.generate.params.seed for g in request.generations] == [10, 11, 12]
    assert [g.counts_prompt for g in request.generations] == [True, False, False]
    text = parse({"prompt": ["a", "b"], "n": 2}, Endpoint.TEXT, LIMITS, max_n=4)
    assert [g.generate.raw_prompt for g in text.generations] == ["a", "a", "b", "b"]
    assert [g.counts_prompt for g in text.generations] == [True, False, True, False]
    assert text.generations[0].generate.history == []


def test_limits_are_the_shared_rules_named_as_the_client_named_them() -> None:
    assert refusal(max_tokens=300).message == "max_tokens is 300, it must be in 1..256"
    assert refusal(max_completion_tokens=-1).message == "max_completion_tokens is -1, it must be in 1..256"
    assert refusal(temperature=float("nan")).message == "temperature is nan, it must be in [0, 2]"
    assert refusal(stop=["a"] * 9).message == "stop has 9 strings, at most 8 are allowed"
    assert refusal(Endpoint.TEXT, prompt="").message == "prompt is empty"
    assert "request too large" in refusal(Endpoint.TEXT, prompt="x" * ((1 << 16) + 1)).message


@pytest.mark.parametrize(
    ("endpoint", "body", "wanted"),
    [
        (Endpoint.CHAT, {"top_k": -2}, "top_k is -2"),
        (Endpoint.CHAT, {"n": 5}, "n is 5, it must be in 1..4 (http.max_n)"),
        (Endpoint.CHAT, {"frequency_penalty": 1}, "frequency_penalty 1 is not supported"),
        (Endpoint.CHAT, {"top_logprobs": 2}, "top_logprobs is not supported"),
        (Endpoint.CHAT, {"tool_choice": "required"}, "tool_choice is not supported"),
        (Endpoint.CHAT, {"logit_bias": {"42": 5}}, "logit_bias is not supported"),
        (Endpoint.CHAT, {"max_tokens": True}, "max_tokens must be an integer, got a boolean"),
        (Endpoint.TEXT, {"prompt": [1, 2, 3]}, "prompts of token ids are not supported"),
        (Endpoint.TEXT, {"prompt": "x", "suffix": "y"}, "suffix is not supported"),
        (Endpoint.TEXT, {"prompt": "x", "logprobs": 1}, "logprobs is not supported"),
        (Endpoint.TEXT, {"prompt": "x", "best_of": 3}, "best_of 3 is not supported"),
        (Endpoint.TEXT, {}, "prompt must be a string or a non-empty list of strings, got null"),
    ],
)
def test_unsupported_or_mistyped_fields_are_refused_by_name(
    endpoint: Endpoint, body: dict[str, Any], wanted: str
) -> None:
    assert wanted in refusal(endpoint, **body).message


def test_http_config_defaults_to_loopback_and_null_turns_it_off(tmp_path: Any) -> None:
    assert HttpConfig().listen == "127.0.0.1:8000"
    path = tmp_path / "pool.yaml"
    path.write_text("http:\n  listen: null\n")
    assert load_config(path).http.listen is None
    path.write_text("http:\n  listen: nowhere\n")
    with pytest.raises(ConfigError, match=re.escape("http.listen: must be host:port")):
        load_config(path)
    path.write_text("http:\n  max_n: 0\n")
    with pytest.raises(ConfigError, match=re.escape("http.max_n: must be >= 1")):
        load_config(path)
