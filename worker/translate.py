"""Conversions between the wire messages (protos/worker.proto) and the inference core's types."""

from __future__ import annotations

import time

from protos import worker_pb2 as pb
from worker.core.request import ChatRequest, Chunk, FinishReason, SamplingParams, Turn

_FINISH_ON_WIRE = {
    FinishReason.STOP: pb.FINISH_STOP,
    FinishReason.LENGTH: pb.FINISH_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_CANCELLED,
}


def chat_request(generate: pb.Generate) -> ChatRequest:
    """The engine's view of a Generate; absent optional parameters stay None (= configured default)."""
    params = generate.params
    return ChatRequest(
        system_message=generate.system_message,
        history=tuple(Turn(role=turn.role, content=turn.content) for turn in generate.history),
        params=SamplingParams(
            max_new_tokens=_optional(params, "max_new_tokens"),
            temperature=_optional(params, "temperature"),
            top_p=_optional(params, "top_p"),
            top_k=_optional(params, "top_k"),
            repetition_penalty=_optional(params, "repetition_penalty"),
            seed=_optional(params, "seed"),
            stop=tuple(params.stop),
        ),
        raw_prompt=generate.raw_prompt if generate.HasField("raw_prompt") else None,
    )


def _optional(params: pb.SamplingParams, name: str) -> int | float | None:
    return getattr(params, name) if params.HasField(name) else None


def wire_chunk(request_id: str, chunk: Chunk) -> pb.Chunk:
    finish = pb.FINISH_NONE if chunk.finish_reason is None else _FINISH_ON_WIRE[chunk.finish_reason]
    return pb.Chunk(
        request_id=request_id,
        text=chunk.text,
        completion_tokens=chunk.completion_tokens,
        prompt_tokens=chunk.prompt_tokens,
        finish_reason=finish,
        created_unix_nanos=time.time_ns(),
        cached_prompt_tokens=chunk.cached_prompt_tokens,
    )


def error_chunk(
    request_id: str, kind: pb.ErrorKind, message: str, completion_tokens: int = 0, prompt_tokens: int = 0
) -> pb.Chunk:
    """The final chunk of a generation that failed."""
    return pb.Chunk(
        request_id=request_id,
        completion_tokens=completion_tokens,
        prompt_tokens=prompt_tokens,
        finish_reason=pb.FINISH_ERROR,
        error_kind=kind,
        error_message=message,
        created_unix_nanos=time.time_ns(),
    )


def cancelled_chunk(request_id: str, completion_tokens: int, prompt_tokens: int) -> pb.Chunk:
    return pb.Chunk(
        request_id=request_id,
        completion_tokens=completion_tokens,
        prompt_tokens=prompt_tokens,
        finish_reason=pb.FINISH_CANCELLED,
        created_unix_nanos=time.time_ns(),
    )
