"""OpenAI response bodies: whole completions, and the chunks of a stream as SSE events.

Shapes as the official `openai` SDK parses them (openai-python's types/chat/chat_completion*.py and
types/completion*.py). A stream's chunks all carry the same id and created; the first chunk of
each chat choice carries the role, the last one `finish_reason` with an empty delta; with
stream_options.include_usage every chunk has "usage": null and one last chunk with no choices
carries the totals; then `data: [DONE]`.

The text chunks are the hot path (one per token): each is a pre-rendered head and tail around the
JSON-escaped text, not a dict through json.dumps.
"""

from __future__ import annotations

import json
import time
from typing import Any

from protos import worker_pb2
from router.http.openai_requests import Endpoint

DONE_EVENT = b"data: [DONE]\n\n"
FINISH_NAMES = {worker_pb2.FINISH_STOP: "stop", worker_pb2.FINISH_LENGTH: "length"}
SYSTEM_FINGERPRINT = "fp_bm_pool"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ResponseWriter:
    """The bodies of one request's answer: its id, creation time and model are fixed at the start."""

    def __init__(self, endpoint: Endpoint, request_id: str, model: str, include_usage: bool) -> None:
        self._chat = endpoint is Endpoint.CHAT
        self.id = f"{'chatcmpl' if self._chat else 'cmpl'}-{request_id}"
        self._created = int(time.time())
        self._model = model
        self._include_usage = include_usage
        self._head = self._envelope("chat.completion.chunk" if self._chat else "text_completion")
        self._tail = ',"usage":null}' if include_usage else "}"
        self._text_heads: dict[int, bytes] = {}

    # -- whole answers ---------------------------------------------------------------------------

    def completion(
        self, choices: list[tuple[str, int]], prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        """The non-streamed answer; `choices` are (text, finish reason) in index order."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion" if self._chat else "text_completion",
            "created": self._created,
            "model": self._model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                self._whole_choice(index, text, finish) for index, (text, finish) in enumerate(choices)
            ],
            "usage": usage(prompt_tokens, completion_tokens),
        }
        return body

    def _whole_choice(self, index: int, text: str, finish: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self._chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = FINISH_NAMES.get(finish, "stop")
        return choice

    # -- stream events ---------------------------------------------------------------------------

    def role_event(self, index: int) -> bytes:
        """The first chunk of a chat choice: the role, no text yet (nothing for text completions)."""
        return self._event(index, {"role": "assistant", "content": ""}, None)

    def text_event(self, index: int, text: str) -> bytes:
        head = self._text_heads.get(index)
        if head is None:
            opening = '"delta":{"content":' if self._chat else '"text":'
            head = self._text_heads[index] = (
                f'data: {self._head}"choices":[{{"index":{index},{opening}'.encode()
            )
        closing = "}" if self._chat else ""
        escaped = json.dumps(text, ensure_ascii=False)
        return head + f'{escaped}{closing},"logprobs":null,"finish_reason":null}}]{self._tail}\n\n'.encode()

    def finish_event(self, index: int, finish: int) -> bytes:
        return self._event(index, {}, FINISH_NAMES.get(finish, "stop"))

    def usage_event(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        body = json.loads(self._head + '"choices":[]}')
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return sse_event(body)

    def _event(self, index: int, delta: dict[str, str], finish: str | None) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if self._chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("content", "")
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        body = json.loads(self._head + '"choices":[]}')
        body["choices"] = [choice]
        if self._include_usage:
            body["usage"] = None
        return sse_event(body)

    def _envelope(self, kind: str) -> str:
        """The chunk's fields before "choices", as JSON text ending in a comma."""
        fields = {
            "id": self.id,
            "object": kind,
            "created": self._created,
            "model": self._model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))[:-1] + ","
