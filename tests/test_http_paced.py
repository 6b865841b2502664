"""The HTTP front on the wire, against a real pool of paced workers that echo their prompt
(`python -m supervisor`, loopback): the SSE bytes, malformed and hostile bodies, a client that
disconnects, an engine that fails mid-stream, 100 gRPC and HTTP streams at once, and a SIGTERM drain
of both fronts.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from protos import inference_pb2 as api
from tests.harness import (
    WAIT_S,
    ConfigFile,
    Pool,
    ProcessSet,
    inference_stub,
    start_pool,
    wait_until,
    write_config,
)

MODEL = "paced-echo"
LONG_TOKENS = 400  # at 100 tokens/s: a stream that runs for 4 s unless cancelled
FAIL_MARKER = "FAILNOW"
TIMEOUT_S = 60


def paced_config(directory: Path) -> ConfigFile:
    return write_config(
        directory,
        {
            "model": {
                "name": MODEL,
                "defaults": {"max_new_tokens": 8},
                "paced": {
                    "tokens_per_second": 100.0,
                    "first_token_delay_s": 0.02,
                    "tokens_per_request": LONG_TOKENS,
                    "echo": True,
                    "fail_marker": FAIL_MARKER,
                    "fault_at_token": 3,
                },
            },
            "http": {"body_timeout_s": 0.5},
        },
    )


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    directory = tmp_path_factory.mktemp("http-paced")
    with ProcessSet(directory) as procs:
        pool = start_pool(procs, paced_config(directory))
        yield pool
        pool.channel.close()


def http_address(pool: Pool) -> tuple[str, int]:
    host, _, port = pool.config.raw["http"]["listen"].rpartition(":")
    return host, int(port)


def post(pool: Pool, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    """(status, headers, body) of one POST over a fresh connection."""
    connection = http.client.HTTPConnection(*http_address(pool), timeout=TIMEOUT_S)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def chat_body(content: str, **params: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], **params}).encode()


def echoed(words: str, tokens: int) -> str:
    """What a paced echo worker answers: the prompt's words, cycled, one per token."""
    cycle = words.split()
    return " ".join(cycle[index % len(cycle)] for index in range(tokens))


def error_of(status: int, body: bytes, expected_status: int) -> dict[str, Any]:
    assert status == expected_status, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_the_stream_is_server_sent_events_byte_for_byte(pool: Pool) -> None:
    status, headers, body = post(
        pool,
        "/v1/chat/completions",
        chat_body("alpha beta", stream=True, stream_options={"include_usage": True}),
    )
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache" and headers["X-Accel-Buffering"] == "no"
    assert body.endswith(b"\n\ndata: [DONE]\n\n")
    events = body.split(b"\n\n")[:-1]
    assert all(event.startswith(b"data: ") and b"\n" not in event for event in events)
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
    assert {(chunk["id"], chunk["created"]) for chunk in chunks} == {(chunks[0]["id"], chunks[0]["created"])}
    assert chunks[0]["id"] == f"chatcmpl-{headers['x-request-id']}"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks[1:-2])
    assert text == echoed("alpha beta", 8)
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize(
    ("body", "status", "wanted"),
    [
        (b"{not json", 400, "the body is not valid JSON"),
        (b"\xff\xfe", 400, "the body is not valid JSON"),
        (b"[1, 2]", 400, "the body must be a JSON object, got a list"),
        (chat_body("hi", temperature="hot"), 400, "temperature must be a number, got a string 'hot'"),
        (chat_body("hi", stream="yes"), 400, "stream must be a boolean"),
        (json.dumps({"model": MODEL}).encode(), 400, "messages must be a non-empty list"),
        (chat_body("hi", n=99), 400, "n is 99, it must be in 1..8 (http.max_n)"),
        (chat_body("hi", tools=[{"type": "function"}]), 400, "tools are not supported"),
        (chat_body("hi", logprobs=True), 400, "logprobs is not supported"),
        (chat_body("hi", presence_penalty=0.5), 400, "presence_penalty 0.5 is not supported"),
        (chat_body("hi", response_format={"type": "json_object"}), 400, "response_format 'json_object'"),
        (chat_body("hi", stop=[1, 2]), 400, "stop must be a string or a list of strings"),
        (chat_body("hi", seed=-1), 400, "seed is -1"),
        (chat_body("hi", stream_options={"include_usage": True}), 400, "only allowed with stream: true"),
        (b'{"model": "paced-echo", "messages": [{"role": "tool", "content": "x"}]}', 400, "role 'tool'"),
        (b'{"messages": [{"role": "assistant", "content": "x"}]}', 400, "must end with a user message"),
        (b'{"messages": [{"role": "user", "content": "  "}]}', 400, "messages[0].content is empty"),
        (chat_body("x" * (1 << 20)), 413, "request too large"),
    ],
)
def test_malformed_bodies_get_a_clear_4xx(pool: Pool, body: bytes, status: int, wanted: str) -> None:
    reply_status, _headers, reply = post(pool, "/v1/chat/completions", body)
    assert wanted in error_of(reply_status, reply, status)["message"]


def test_unusable_request_ids_paths_and_methods_are_openai_errors(pool: Pool) -> None:
    status, _headers, body = post(
        pool, "/v1/chat/completions", chat_body("hi"), {"x-request-id": "has space"}
    )
    assert "x-request-id" in error_of(status, body, 400)["message"]
    status, _headers, body = post(pool, "/v1/embeddings", b"{}")
    error_of(status, body, 404)
    connection = http.client.HTTPConnection(*http_address(pool), timeout=TIMEOUT_S)
    connection.request("GET", "/v1/chat/completions")
    response = connection.getresponse()
    error_of(response.status, response.read(), 405)
    connection.close()


def test_a_body_that_arrives_too_slowly_gets_408_and_harms_nothing(pool: Pool) -> None:
    with socket.create_connection(http_address(pool), timeout=TIMEOUT_S) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        status, _headers, body = post(pool, "/v1/chat/completions", chat_body("still served"))
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == echoed(
            "still served", 8
        )
        reply = slow.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"did not arrive within 0.5 s (http.body_timeout_s)" in reply


def test_an_engine_failure_mid_stream_is_an_error_event_and_before_the_end_a_500(pool: Pool) -> None:
    client = openai.OpenAI(
        base_url=f"http://{pool.config.raw['http']['listen']}/v1", api_key="-", max_retries=0
    )
    texts = []
    with pytest.raises(openai.APIError, match="injected fault: engine error at token 3"):
        for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"{FAIL_MARKER} go"}], stream=True
        ):
            texts.append(chunk.choices[0].delta.content)
    assert texts == ["", FAIL_MARKER, " go"]
    with pytest.raises(openai.InternalServerError, match="injected fault"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FAIL_MARKER}])


def test_a_client_that_disconnects_frees_its_worker(pool: Pool) -> None:
    with socket.create_connection(http_address(pool), timeout=TIMEOUT_S) as client:
        body = chat_body("leaving soon", stream=True, max_tokens=LONG_TOKENS)
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"x-request-id: leaver-1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while received.count(b"data: ") < 3:  # the role chunk and two tokens
            received += client.recv(65536)
    done = pool.supervisor.wait_for_log(r"request leaver-1: done, cancelled; prompt \d+ tokens, (\d+) tokens")
    assert int(done.group(1)) < LONG_TOKENS
    pool.supervisor.wait_for_log(r"request leaver-1: http /v1/chat/completions CANCELLED")
    status, _headers, reply = post(
        pool, "/v1/completions", json.dumps({"prompt": "next one", "max_tokens": 2}).encode()
    )
    assert status == 200 and json.loads(reply)["choices"][0]["text"] == "next one"


def test_a_hundred_grpc_and_http_streams_at_once_each_get_their_own_text(pool: Pool) -> None:
    address = pool.config.raw["http"]["listen"]
    client = openai.OpenAI(base_url=f"http://{address}/v1", api_key="-", max_retries=0, timeout=TIMEOUT_S)
    stub = inference_stub(pool.channel)

    def over_http(index: int) -> tuple[str, str]:
        words = f"http{index} words{index}"
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": words}], stream=True, max_tokens=6
        )
        return words, "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    def over_grpc(index: int) -> tuple[str, str]:
        words = f"grpc{index} words{index}"
        request = api.CompletionRequest(history=[api.ChatMessage(role=1, content=words)], max_new_tokens=6)
        return words, "".join(frame.output_text for frame in stub.StreamComplete(request, timeout=TIMEOUT_S))

    with ThreadPoolExecutor(max_workers=100) as threads:
        futures = [threads.submit(over_http if index % 2 else over_grpc, index) for index in range(100)]
        answers = [future.result(timeout=TIMEOUT_S) for future in futures]
    assert len({words for words, _ in answers}) == 100
    for words, text in answers:
        assert text == echoed(words, 6)


def test_sigterm_drains_both_fronts(tmp_path: Path, procs: ProcessSet) -> None:
    pool = start_pool(procs, paced_config(tmp_path))
    host, port = http_address(pool)
    http_stream = socket.create_connection((host, port), timeout=TIMEOUT_S)
    body = chat_body("drain me", stream=True, max_tokens=100)
    http_stream.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    grpc_stream = inference_stub(pool.channel).StreamComplete(
        api.CompletionRequest(history=[api.ChatMessage(role=1, content="drain me too")], max_new_tokens=100),
        timeout=TIMEOUT_S,
    )
    next(grpc_stream)
    received = http_stream.recv(65536)
    pool.supervisor.signal(signal.SIGTERM)
    pool.supervisor.wait_for_log(r"draining: 2 open calls")
    status, _headers, reply = post(pool, "/v1/chat/completions", chat_body("too late"))
    assert "the router is shutting down (draining)" in error_of(status, reply, 503)["message"]
    with pytest.raises(grpc.RpcError) as refused:
        inference_stub(pool.channel).Complete(
            api.CompletionRequest(history=[api.ChatMessage(role=1, content="x")])
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sum(1 for _ in grpc_stream) > 0  # the in-flight gRPC stream runs to its end
    deadline = time.monotonic() + WAIT_S
    while not received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n") and time.monotonic() < deadline:
        received += http_stream.recv(65536)
    http_stream.close()
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the last SSE event, then the chunked end
    texts = re.findall(rb'"content":"([^"]*)"', received)
    assert b"".join(texts).decode() == echoed("drain me", 100)  # every token, none lost
    assert pool.supervisor.wait(WAIT_S) == 0
    wait_until(lambda: pool.router_process() is None, "the router to exit")
