"""OpenAI request bodies turned into internal Generate messages, through the gRPC front's validation.

The OpenAI shape (messages, max_tokens, stop as a string or a list, n, ...) is checked here: JSON
types, what the pool does not support (images, tools, logprobs, penalties other than 0, echo,
suffix, ...), and the structure of the conversation, each refused with a message naming the field.
The generation parameters then go into a CompletionRequest and through router/validation.py, so
every limit (temperature, top_p, repetition_penalty, stop strings, max tokens, request size) is
defined once and worded the same on both fronts.

Parameters a request leaves out stay absent: the worker applies the deployment's defaults (as
vLLM applies a model's generation config), so `temperature` is not forced to OpenAI's 1.0.
Extensions accepted as vLLM accepts them: `top_k` (-1 or 0 = no cut) and `repetition_penalty`.
With n > 1, choice j gets seed + j, so the choices differ and the request stays reproducible.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from protos import inference_pb2, worker_pb2
from router.http.errors import ApiError
from router.validation import (
    ASSISTANT,
    USER,
    RequestLimits,
    ValidationError,
    check_max_new_tokens,
    validate,
    validate_raw_prompt,
)

SEED_LIMIT = 1 << 64  # the wire's uint64
UINT32_LIMIT = 1 << 32
SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system role
ROLES = {"user": USER, "assistant": ASSISTANT}
SYSTEM_JOINER = "\n\n"  # several system messages become one system message


class Endpoint(enum.Enum):
    CHAT = "/v1/chat/completions"
    TEXT = "/v1/completions"


@dataclass(frozen=True)
class Generation:
    """One choice to generate: its Generate, and whether its prompt counts in usage (the first
    choice of each distinct prompt: OpenAI counts a prompt once however many choices it has)."""

    generate: worker_pb2.Generate
    counts_prompt: bool


@dataclass(frozen=True)
class OpenAIRequest:
    endpoint: Endpoint
    model: str | None  # None: the client named none (the served model is used)
    generations: list[Generation]  # in choice-index order
    stream: bool
    include_usage: bool
    user: str | None


def parse(body: object, endpoint: Endpoint, limits: RequestLimits, max_n: int) -> OpenAIRequest:
    """The request, or ApiError(INVALID_ARGUMENT) naming what is wrong."""
    if not isinstance(body, dict):
        raise _invalid(f"the body must be a JSON object, got {_json_type(body)}")
    try:
        return _parse(body, endpoint, limits, max_n)
    except ValidationError as error:
        raise _invalid(str(error)) from None


def _parse(body: dict[str, Any], endpoint: Endpoint, limits: RequestLimits, max_n: int) -> OpenAIRequest:
    fields = _Fields(body)
    stream = fields.boolean("stream") or False
    include_usage = _include_usage(fields, stream)
    n = fields.integer("n")
    if n is not None and not 1 <= n <= max_n:
        raise _invalid(f"n is {n}, it must be in 1..{max_n} (http.max_n)", "n")
    n = n or 1
    _refuse_unsupported(fields, endpoint, n)
    params, names = _params(fields, limits)
    if endpoint is Endpoint.CHAT:
        system_message, history = _conversation(body.get("messages"))
        request = inference_pb2.CompletionRequest(system_message=system_message, history=history)
        request.MergeFrom(params)
        prompts = [validate(request, limits, names)]
    else:
        prompts = [validate_raw_prompt(text, params, limits, names) for text in _prompts(body.get("prompt"))]
    return OpenAIRequest(
        endpoint=endpoint,
        model=fields.string("model"),
        generations=[
            Generation(_choice(generate, choice), counts_prompt=choice == 0)
            for generate in prompts
            for choice in range(n)
        ],
        stream=stream,
        include_usage=include_usage,
        user=fields.string("user"),
    )


def _choice(generate: worker_pb2.Generate, choice: int) -> worker_pb2.Generate:
    """The Generate of choice number `choice` of a prompt (its own seed, when one is set)."""
    if choice == 0:
        return generate
    copy = worker_pb2.Generate()
    copy.CopyFrom(generate)
    if copy.params.HasField("seed"):
        copy.params.seed = (copy.params.seed + choice) % SEED_LIMIT
    return copy


def _include_usage(fields: _Fields, stream: bool) -> bool:
    options = fields.mapping("stream_options")
    if options is None:
        return False
    if not stream:
        raise _invalid("stream_options is only allowed with stream: true", "stream_options")
    value = options.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise _invalid(
            f"stream_options.include_usage must be a boolean, got {_json_type(value)}", "stream_options"
        )
    return bool(value)


def _refuse_unsupported(fields: _Fields, endpoint: Endpoint, n: int) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        value = fields.number(name)
        if value not in (None, 0.0):
            raise _invalid(f"{name} {value:g} is not supported: only 0 (use repetition_penalty)", name)
    if fields.mapping("logit_bias"):
        raise _invalid("logit_bias is not supported", "logit_bias")
    if endpoint is Endpoint.CHAT:
        if fields.boolean("logprobs"):
            raise _invalid("logprobs is not supported", "logprobs")
        if fields.integer("top_logprobs") is not None:
            raise _invalid("top_logprobs is not supported", "top_logprobs")
        for name in ("tools", "functions"):
            if fields.raw(name):
                raise _invalid(f"{name} are not supported: the pool serves plain chat", name)
        for name in ("tool_choice", "function_call"):
            if fields.raw(name) not in (None, "none", "auto"):
                raise _invalid(f"{name} is not supported: the pool serves plain chat", name)
        response_format = fields.mapping("response_format")
        if response_format is not None and response_format.get("type") != "text":
            raise _invalid(
                f"response_format {response_format.get('type')!r} is not supported: only 'text'",
                "response_format",
            )
        return
    if fields.boolean("echo"):
        raise _invalid("echo is not supported", "echo")
    if fields.string("suffix"):
        raise _invalid("suffix is not supported", "suffix")
    if fields.integer("logprobs") is not None:
        raise _invalid("logprobs is not supported", "logprobs")
    best_of = fields.integer("best_of")
    if best_of is not None and best_of != n:
        raise _invalid(
            f"best_of {best_of} is not supported: only best_of = n (each choice is returned)", "best_of"
        )


def _params(fields: _Fields, limits: RequestLimits) -> tuple[inference_pb2.CompletionRequest, dict[str, str]]:
    """The generation parameters (in a CompletionRequest, as validation takes them) and the names
    this request used for them."""
    params = inference_pb2.CompletionRequest()
    names: dict[str, str] = {}
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins, as in vLLM
        value = fields.integer(name)
        if value is not None:
            check_max_new_tokens(value, limits, name)
            params.max_new_tokens = value
            names["max_new_tokens"] = name
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = fields.number(name)
        if value is not None:
            setattr(params, name, value)
    top_k = fields.integer("top_k")
    if top_k is not None:
        if not -1 <= top_k < UINT32_LIMIT:
            raise _invalid(f"top_k is {top_k}, it must be -1 or 0 (no cut) or a positive count", "top_k")
        params.top_k = max(top_k, 0)
    seed = fields.integer("seed")
    if seed is not None:
        if not 0 <= seed < SEED_LIMIT:
            raise _invalid(f"seed is {seed}, it must be in 0..2^64-1", "seed")
        params.seed = seed
    params.stop.extend(_stop(fields.raw("stop")))
    return params, names


def _stop(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise _invalid(f"stop must be a string or a list of strings, got {_json_type(value)}", "stop")


def _conversation(messages: object) -> tuple[str, list[inference_pb2.ChatMessage]]:
    """(the joined system messages, the user/assistant turns) of an OpenAI messages list."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages must be a non-empty list of {role, content} objects", "messages")
    systems: list[str] = []
    history: list[inference_pb2.ChatMessage] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _invalid(
                f"{where} must be an object with role and content, got {_json_type(message)}", "messages"
            )
        role = message.get("role")
        if message.get("tool_calls") or message.get("function_call"):
            raise _invalid(f"{where} has tool calls: tools are not supported", "messages")
        content = _text_content(message.get("content"), where)
        if role in SYSTEM_ROLES:
            systems.append(content)
            continue
        if role not in ROLES:
            raise _invalid(
                f"{where}.role {role!r} is not supported: use system, developer, user or assistant",
                "messages",
            )
        if not content.strip():
            raise _invalid(f"{where}.content is empty or only whitespace", "messages")
        history.append(inference_pb2.ChatMessage(role=ROLES[role], content=content))
    if not history or history[-1].role != USER:
        last = "no user or assistant message" if not history else "an assistant message"
        raise _invalid(
            f"the conversation must end with a user message, it ends with {last} "
            "(continuing an assistant message is not supported)",
            "messages",
        )
    return SYSTEM_JOINER.join(systems), history


def _text_content(content: object, where: str) -> str:
    """A message's text: a string, or the concatenation of an array of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                shown = repr(kind) if kind is not None else _json_type(part)
                raise _invalid(
                    f"{where}.content[{index}] is of type {shown}: only text parts "
                    '({"type": "text", "text": ...}) are supported',
                    "messages",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid(
        f"{where}.content must be a string or a list of text parts, got {_json_type(content)}", "messages"
    )


def _prompts(prompt: object) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(item, int | list) for item in prompt):
        raise _invalid("prompts of token ids are not supported: send text", "prompt")
    raise _invalid(
        f"prompt must be a string or a non-empty list of strings, got {_json_type(prompt)}", "prompt"
    )


class _Fields:
    """Typed reads of a request body's optional fields: absent or null is None, a wrong type is a 400."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self._body = body

    def raw(self, name: str) -> Any:
        return self._body.get(name)

    def number(self, name: str) -> float | None:
        return self._typed(name, "a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool))

    def integer(self, name: str) -> int | None:
        return self._typed(name, "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))

    def boolean(self, name: str) -> bool | None:
        return self._typed(name, "a boolean", lambda v: isinstance(v, bool))

    def string(self, name: str) -> str | None:
        return self._typed(name, "a string", lambda v: isinstance(v, str))

    def mapping(self, name: str) -> dict[str, Any] | None:
        return self._typed(name, "an object", lambda v: isinstance(v, dict))

    def _typed(self, name: str, kind: str, matches: Callable[[Any], bool]) -> Any:
        value = self._body.get(name)
        if value is None or matches(value):
            return value
        raise _invalid(f"{name} must be {kind}, got {_json_type(value)} {_shown(value)}", name)


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message, param=param)


def _json_type(value: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}..."
