"""The OpenAI-compatible HTTP front end to end: the official `openai` SDK (sync and async) against the
real pool (`python -m supervisor`: router + two numpy workers of the tiny chat model, on loopback).

The tiny model never picks its end-of-sequence token greedily (tests/tiny_chat_model.py), so greedy
answers run exactly to max_tokens and can be compared token for token with the gRPC front's.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from protos import inference_pb2 as api
from tests.harness import Pool, ProcessSet, inference_stub, start_pool, write_config
from worker.core.tokenizer import load_tokenizer

MODEL = "tiny-chat"
SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France?"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path) -> Iterator[Pool]:
    directory = tmp_path_factory.mktemp("http-pool")
    config = write_config(
        directory,
        {
            "model": {
                "name": MODEL,
                "engine": "numpy",
                "path": str(tiny_chat_model),
                "context_size": 4096,
                "defaults": {"max_new_tokens": 16, "temperature": 0.0},
            },
            "workers": {"allow_cpu_oversubscription": True},
        },
    )
    with ProcessSet(directory) as procs:
        pool = start_pool(procs, config)
        yield pool
        pool.channel.close()


def base_url(pool: Pool) -> str:
    return f"http://{pool.config.raw['http']['listen']}"


@pytest.fixture(scope="module")
def client(pool: Pool) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{base_url(pool)}/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S
    ) as sdk:
        yield sdk


def grpc_text(pool: Pool, **params: float | int) -> api.Completion:
    """The gRPC front's answer (StreamComplete) to the same conversation, as one Completion."""
    request = api.CompletionRequest(
        system_message=SYSTEM, history=[api.ChatMessage(role=1, content=QUESTION)], **params
    )
    frames = list(inference_stub(pool.channel).StreamComplete(request, timeout=TIMEOUT_S))
    last = frames[-1]
    return api.Completion(
        output_text="".join(frame.output_text for frame in frames),
        prompt_tokens=last.prompt_tokens,
        token_usage=last.token_usage,
    )


def test_greedy_chat_text_equals_stream_complete_streamed_or_not(pool: Pool, client: openai.OpenAI) -> None:
    expected = grpc_text(pool, temperature=0.0, max_new_tokens=12)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12)
    assert whole.choices[0].message.content == expected.output_text
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (expected.prompt_tokens, 12)
    assert whole.usage.total_tokens == expected.prompt_tokens + 12
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion" and whole.model == MODEL
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12, stream=True
        )
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected.output_text


def test_async_stream_with_include_usage_has_the_openai_chunk_sequence(pool: Pool) -> None:
    async def run() -> list[openai.types.chat.ChatCompletionChunk]:
        async with openai.AsyncOpenAI(base_url=f"{base_url(pool)}/v1", api_key="none", max_retries=0) as sdk:
            stream = await sdk.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert len({chunk.id for chunk in chunks}) == 1 and len({chunk.created for chunk in chunks}) == 1
    first, *content, finish, totals = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(chunk.usage is None and chunk.choices[0].finish_reason is None for chunk in [first, *content])
    assert finish.choices[0].finish_reason == "length" and finish.choices[0].delta.content is None
    assert totals.choices == [] and totals.usage is not None and totals.usage.completion_tokens == 8
    assert totals.usage.total_tokens == totals.usage.prompt_tokens + 8


def test_the_same_seed_gives_the_same_sampled_answer(client: openai.OpenAI) -> None:
    def sampled(seed: int) -> str:
        answer = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=1.0, top_p=1.0, max_tokens=16, seed=seed
        )
        return answer.choices[0].message.content or ""

    assert sampled(42) == sampled(42)
    assert sampled(42) != sampled(43)


def test_stop_ends_the_answer_before_the_stop_string(client: openai.OpenAI) -> None:
    full = (
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16)
        .choices[0]
        .message.content
    )
    assert full is not None and len(full) > 8
    stop = full[5:8]
    cut = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, stop=[stop, "never-seen"]
    )
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_n_choices_are_separate_generations_with_summed_usage(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, temperature=1.0, top_p=1.0, max_tokens=6, seed=5
    )
    assert [choice.index for choice in answer.choices] == [0, 1]
    assert answer.choices[0].message.content != answer.choices[1].message.content  # seeds 5 and 6
    assert answer.usage is not None and answer.usage.completion_tokens == 12


def test_a_raw_prompt_is_continued_without_the_chat_template(
    client: openai.OpenAI, tiny_chat_model: Path
) -> None:
    prompt = "The capital of France is"
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(load_tokenizer(tiny_chat_model).encode_prompt(prompt))
    assert answer.usage.completion_tokens == 6 and answer.choices[0].text
    several = client.completions.create(model=MODEL, prompt=[prompt, "Once upon a time"], max_tokens=3)
    assert [choice.index for choice in several.choices] == [0, 1]
    streamed = list(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == answer.choices[0].text


def test_invalid_parameters_get_the_grpc_fronts_message(pool: Pool, client: openai.OpenAI) -> None:
    with pytest.raises(grpc.RpcError) as grpc_refusal:
        grpc_text(pool, temperature=5.0)
    with pytest.raises(openai.BadRequestError) as http_refusal:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5.0)
    assert grpc_refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert http_refusal.value.message.endswith(grpc_refusal.value.details())
    with pytest.raises(openai.BadRequestError, match=r"max_tokens is 0, it must be in 1\.\.4096"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [image]}])
    with pytest.raises(openai.BadRequestError, match="echo is not supported"):
        client.completions.create(model=MODEL, prompt="x", echo=True)


def test_request_ids_go_in_and_out_and_name_the_front_in_the_log(pool: Pool, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, extra_headers={"x-request-id": "http-trace-7"}
    )
    assert raw.headers["x-request-id"] == "http-trace-7"
    assert raw.parse().id == "chatcmpl-http-trace-7"
    pool.supervisor.wait_for_log(
        r"request http-trace-7: http /v1/chat/completions OK, model tiny-chat, finish length"
    )


def test_models_health_and_metrics_share_the_port(pool: Pool, client: openai.OpenAI) -> None:
    (model,) = client.models.list().data
    assert (model.id, model.owned_by, model.model_extra) == (MODEL, "bm1684x-pool", {"max_model_len": 4096})
    with urllib.request.urlopen(f"{base_url(pool)}/health", timeout=TIMEOUT_S) as health:
        assert health.status == 200
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    with urllib.request.urlopen(f"{base_url(pool)}/metrics", timeout=TIMEOUT_S) as metrics:
        text = metrics.read().decode()
    assert 'bm_pool_requests_total{finish_reason="length",front="http",grpc_code="OK",' in text
    assert 'bm_pool_request_duration_seconds_count{front="http"}' in text
