"""Chat templates render exactly what the template says, in transformers' Jinja environment."""

from __future__ import annotations

import re

import pytest

from worker.core.chat_template import ChatTemplate, select_template
from worker.core.request import ASSISTANT, USER, RequestError, Turn

CONVERSATION = (Turn(USER, "你好"), Turn(ASSISTANT, "Hello! 有什么可以帮你？"), Turn(USER, "Tell me a joke."))


def test_chatml_renders_every_turn_and_opens_the_answer():
    prompt = ChatTemplate.chatml().render("You are a helpful assistant.", CONVERSATION)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\nHello! 有什么可以帮你？<|im_end|>\n"
        "<|im_start|>user\nTell me a joke.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chatml_without_system_message_has_no_system_turn():
    assert ChatTemplate.chatml().render("", [Turn(USER, "hi")]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_from_tokenizer_config(tiny_chat_tokenizer):
    template = tiny_chat_tokenizer.chat_template
    assert template.origin.endswith("tokenizer_config.json")
    assert template.render("Be brief.", CONVERSATION) == ChatTemplate.chatml().render(
        "Be brief.", CONVERSATION
    )
    assert (
        template.render("", [Turn(USER, "hi")]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen25_template_from_tokenizer_config(qwen25_tokenizer):
    template = qwen25_tokenizer.chat_template
    assert template.origin.endswith("tokenizer_config.json")
    assert template.render("Be brief.", CONVERSATION) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\nHello! 有什么可以帮你？<|im_end|>\n"
        "<|im_start|>user\nTell me a joke.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # With no system message the template supplies its own default.
    assert template.render("", [Turn(USER, "hi")]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_raise_exception_in_a_template_becomes_a_request_error():
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with the user') }}"
        "{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}",
        origin="test template",
    )
    assert template.render("", [Turn(USER, "hi")]) == "hi"
    with pytest.raises(
        RequestError, match=r"chat template from test template .*Conversation must start with the user"
    ):
        template.render("system text", [Turn(USER, "hi")])


def test_blocks_are_trimmed_like_transformers():
    source = """{% for message in messages %}
    {% if message.role == 'user' %}
U: {{ message.content }}
    {% else %}
A: {{ message.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
A:
{% endif %}
"""
    assert (
        ChatTemplate(source, origin="t").render("", CONVERSATION[:2])
        == "U: 你好\nA: Hello! 有什么可以帮你？\nA:\n"
    )


def test_transformers_helpers_are_available():
    source = (
        "{{ bos_token }}{{ messages | tojson }}|{{ strftime_now('%Y') }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}{{ eos_token }}"
    )
    rendered = ChatTemplate(
        source, origin="t", special_tokens={"bos_token": "<s>", "eos_token": "</s>"}
    ).render("", CONVERSATION)
    match = re.fullmatch(r"<s>(.*)\|(\d{4})\|你好</s>", rendered)
    assert match is not None, rendered
    assert match.group(1).startswith('[{"role": "user", "content": "你好"}')  # tojson keeps non-ASCII text


def test_templates_run_sandboxed():
    template = ChatTemplate("{% set _ = messages.append({'role': 'x'}) %}ok", origin="t")
    with pytest.raises(RequestError, match="cannot render this conversation"):
        template.render("", [Turn(USER, "hi")])


def test_invalid_template_and_role_get_clear_errors():
    with pytest.raises(ValueError, match=r"chat template from my/config\.json is not valid Jinja \(line 1\)"):
        ChatTemplate("{% for m in messages %}", origin="my/config.json")
    with pytest.raises(RequestError, match=r"history turn 1 has role 7"):
        ChatTemplate.chatml().render("", [Turn(USER, "hi"), Turn(7, "?")])


def test_named_templates_take_the_default():
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert select_template(named, "cfg") == "D"
    assert select_template("S", "cfg") == "S"
    with pytest.raises(
        ValueError, match=r"cfg: chat_template lists templates \['rag'\] but none named 'default'"
    ):
        select_template([{"name": "rag", "template": "R"}], "cfg")
    with pytest.raises(ValueError, match="must be a string or a list"):
        select_template(42, "cfg")


def test_tojson_takes_the_arguments_templates_pass_it():
    source = (
        "{{ {'b': 1, 'a': '好'} | tojson }}|{{ {'b': 1, 'a': '好'} | tojson(sort_keys=true) }}|"
        "{{ [1, 2] | tojson(indent=1) }}|{{ {'a': 1} | tojson(separators=(',', ':')) }}|"
        "{{ '好' | tojson(ensure_ascii=true) }}"
    )
    rendered = ChatTemplate(source, origin="t").render("", [Turn(USER, "hi")])
    assert rendered == '{"b": 1, "a": "好"}|{"a": "好", "b": 1}|[\n 1,\n 2\n]|{"a":1}|"\\u597d"'
