"""What a generation is asked to do and what it yields: the inference core's public types."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

USER = 1
ASSISTANT = 2


class FinishReason(enum.Enum):
    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens or the model's context reached
    CANCELLED = "cancelled"  # the cancel flag was set


@dataclass(frozen=True)
class Turn:
    role: int  # USER or ASSISTANT
    content: str


@dataclass(frozen=True)
class SamplingParams:
    """Per-request parameters; None means "use the model's configured default"."""

    max_new_tokens: int | None = None
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 = no cut
    repetition_penalty: float | None = None  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    system_message: str
    history: tuple[Turn, ...]  # oldest first, last turn from the user; empty with a raw prompt
    params: SamplingParams = field(default_factory=SamplingParams)
    # Text to continue as it is, without the chat template (/v1/completions); None: a conversation.
    raw_prompt: str | None = None


@dataclass(frozen=True)
class Chunk:
    """New text since the previous chunk. The last chunk of a generation has finish_reason set."""

    text: str
    completion_tokens: int  # generated tokens so far
    prompt_tokens: int
    finish_reason: FinishReason | None = None
    cached_prompt_tokens: int = 0  # prompt tokens whose keys/values came from the KV cache


class RequestError(ValueError):
    """The request cannot be served as asked (e.g. the last user turn alone exceeds the context).

    Raised before any chunk is yielded; the router maps it to INVALID_ARGUMENT.
    """


class EngineError(RuntimeError):
    """The engine failed while generating; the worker resets its KV state and goes on."""
