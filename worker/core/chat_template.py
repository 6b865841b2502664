"""Chat prompts rendered by the model's own Jinja template, the way Hugging Face transformers renders them.

Same environment as transformers: sandboxed, trim_blocks and lstrip_blocks, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text, loop controls and the `{% generation %}` tag.
Models without a template (Qwen-7B v1) get ChatML.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from worker.core.request import ASSISTANT, USER, RequestError, Turn

ROLE_NAMES = {USER: "user", ASSISTANT: "assistant"}
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplate:
    """A compiled chat template; `origin` says where it came from, for messages and logs."""

    def __init__(self, source: str, *, origin: str, special_tokens: Mapping[str, str] | None = None) -> None:
        self.origin = origin
        self._special_tokens = dict(special_tokens or {})  # bos_token, eos_token, ... as templates expect
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(
                f"chat template from {origin} is not valid Jinja (line {exc.lineno}): {exc}"
            ) from exc

    @classmethod
    def chatml(cls) -> ChatTemplate:
        return cls(CHATML_TEMPLATE, origin="ChatML fallback")

    def render(self, system_message: str, history: Sequence[Turn]) -> str:
        """The prompt text up to and including the opening of the assistant's answer."""
        messages = _messages(system_message, history)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
                tools=None,
                documents=None,
                **self._special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise RequestError(
                f"the chat template from {self.origin} cannot render this conversation: {exc}"
            ) from exc


def select_template(value: object, origin: str) -> str:
    """The text of a `chat_template` setting: a string, or a list of named templates (take "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(entry, dict) for entry in value):
        named = {entry.get("name"): entry.get("template") for entry in value}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(
            f"{origin}: chat_template lists templates {sorted(map(str, named))} but none named 'default'"
        )
    raise ValueError(
        f"{origin}: chat_template must be a string or a list of {{name, template}}, got {type(value)}"
    )


def _messages(system_message: str, history: Sequence[Turn]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_message}] if system_message else []
    for index, turn in enumerate(history):
        role = ROLE_NAMES.get(turn.role)
        if role is None:
            raise RequestError(
                f"history turn {index} has role {turn.role}; "
                f"expected USER ({USER}) or ASSISTANT ({ASSISTANT})"
            )
        messages.append({"role": role, "content": turn.content})
    return messages


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks text for training masks; we keep the body."""

    tags = frozenset({"generation"})

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
