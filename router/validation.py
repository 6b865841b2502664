"""Checks a public CompletionRequest and turns it into the internal Generate message.

Everything a client can get wrong is caught here, before the request takes a queue slot, and
reported as one ValidationError whose message names the field and the rule it broke (the
servicer maps it to INVALID_ARGUMENT). That includes bytes that are not a CompletionRequest at
all: the gRPC server parses requests with parse_request, which never raises. Absent generation
parameters stay absent: the worker applies the model's configured defaults, so the router needs to
know nothing about the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from protos import inference_pb2, worker_pb2

USER = 1
ASSISTANT = 2
ROLE_NAMES = {USER: "user", ASSISTANT: "assistant"}

TEMPERATURE_MAX = 2.0
REPETITION_PENALTY_MAX = 10.0
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256


class ValidationError(ValueError):
    """The request breaks a rule; the message says which field and why."""


@dataclass(frozen=True)
class UnreadableRequest:
    """A request body that does not parse as a CompletionRequest (e.g. a string that is not UTF-8)."""

    problem: str


def parse_request(data: bytes) -> inference_pb2.CompletionRequest | UnreadableRequest:
    """The gRPC request deserializer. It must not raise: gRPC would end the call with UNKNOWN and log
    a traceback, where the client should get INVALID_ARGUMENT saying what is wrong."""
    try:
        return inference_pb2.CompletionRequest.FromString(data)
    except DecodeError as error:
        return UnreadableRequest(str(error))


@dataclass(frozen=True)
class RequestLimits:
    max_request_bytes: int  # serialized request size
    max_new_tokens: int  # the largest max_new_tokens a client may ask for


def validate(
    request: inference_pb2.CompletionRequest | UnreadableRequest,
    limits: RequestLimits,
    names: Mapping[str, str] | None = None,
) -> worker_pb2.Generate:
    """Return the Generate to send to a worker (request_id left empty) or raise ValidationError.

    `names` renames parameters in the messages for a front whose clients call them otherwise
    (the HTTP front's max_tokens is max_new_tokens here); the rules are the same."""
    if isinstance(request, UnreadableRequest):
        raise ValidationError(f"the request is not a valid CompletionRequest: {request.problem}")
    _check_size(request.ByteSize(), limits)
    _check_history(request.history)
    _check_params(request, limits, names or {})
    return _to_generate(request)


def validate_raw_prompt(
    prompt: str,
    params: inference_pb2.CompletionRequest,
    limits: RequestLimits,
    names: Mapping[str, str] | None = None,
) -> worker_pb2.Generate:
    """The Generate for a raw prompt continued without a chat template; `params` carries the
    generation parameters (its history is not used). Same rules as validate()."""
    if not prompt:
        raise ValidationError("prompt is empty")
    _check_size(params.ByteSize() + len(prompt.encode()), limits)
    _check_params(params, limits, names or {})
    generate = _to_generate(params)
    del generate.history[:]
    generate.system_message = ""
    generate.raw_prompt = prompt
    return generate


def _check_size(size: int, limits: RequestLimits) -> None:
    if size > limits.max_request_bytes:
        raise ValidationError(
            f"request too large: {size} bytes, the limit is {limits.max_request_bytes} bytes"
        )


def _check_history(history: list[inference_pb2.ChatMessage]) -> None:
    if not history:
        raise ValidationError("history is empty: it needs at least one user turn (role 1)")
    for index, turn in enumerate(history):
        if turn.role not in ROLE_NAMES:
            raise ValidationError(
                f"history[{index}].role is {turn.role}, an unknown role: use 1 (user) or 2 (assistant)"
            )
        if not turn.content.strip():
            raise ValidationError(f"history[{index}].content is empty or only whitespace")
    last = history[-1]
    if last.role != USER:
        raise ValidationError(
            f"the last turn of history must be from the user (role 1), "
            f"history[{len(history) - 1}] is from the {ROLE_NAMES[last.role]} (role {last.role})"
        )


def _check_params(
    request: inference_pb2.CompletionRequest, limits: RequestLimits, names: Mapping[str, str]
) -> None:
    # Written as "not (low <= x <= high)" so that NaN, which fails every comparison, is refused too.
    if request.HasField("max_new_tokens"):
        check_max_new_tokens(request.max_new_tokens, limits, names.get("max_new_tokens", "max_new_tokens"))
    if request.HasField("temperature") and not 0.0 <= request.temperature <= TEMPERATURE_MAX:
        raise ValidationError(f"temperature is {request.temperature}, it must be in [0, {TEMPERATURE_MAX:g}]")
    if request.HasField("top_p") and not 0.0 < request.top_p <= 1.0:
        raise ValidationError(f"top_p is {request.top_p}, it must be in (0, 1]")
    # top_k is a uint32 in the proto: any value is valid (0 = no top-k cut).
    if (
        request.HasField("repetition_penalty")
        and not 0.0 < request.repetition_penalty <= REPETITION_PENALTY_MAX
    ):
        raise ValidationError(
            f"repetition_penalty is {request.repetition_penalty}, "
            f"it must be in (0, {REPETITION_PENALTY_MAX:g}]"
        )
    _check_stop(request.stop)


def check_max_new_tokens(value: int, limits: RequestLimits, name: str = "max_new_tokens") -> None:
    """Also for a front whose integers may not fit the proto's uint32 (it checks before building it)."""
    if not 1 <= value <= limits.max_new_tokens:
        raise ValidationError(f"{name} is {value}, it must be in 1..{limits.max_new_tokens}")


def _check_stop(stop: list[str]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise ValidationError(f"stop has {len(stop)} strings, at most {MAX_STOP_STRINGS} are allowed")
    for index, text in enumerate(stop):
        if not text:
            raise ValidationError(f"stop[{index}] is empty")
        if len(text) > MAX_STOP_CHARS:
            raise ValidationError(
                f"stop[{index}] has {len(text)} characters, at most {MAX_STOP_CHARS} are allowed"
            )


_OPTIONAL_PARAMS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def _to_generate(request: inference_pb2.CompletionRequest) -> worker_pb2.Generate:
    generate = worker_pb2.Generate(system_message=request.system_message)
    for turn in request.history:
        generate.history.add(role=turn.role, content=turn.content)
    params = generate.params
    for name in _OPTIONAL_PARAMS:
        if request.HasField(name):
            setattr(params, name, getattr(request, name))
    params.stop.extend(request.stop)
    return generate
