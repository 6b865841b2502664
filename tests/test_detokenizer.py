"""Streaming detokenization: no broken characters, and the pieces add up to the whole decode."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.core.detokenizer import StreamDecoder
from worker.core.tokenizer import Tokenizer

# A byte-level BPE, a SentencePiece BPE with byte fallback (both made by the tests), the default model's
# byte-level vocabulary, and the real vocabularies of ../shared/fixtures (skipped when it is absent).
TOKENIZERS = [
    "tiny_chat_tokenizer",
    "tiny_spm_tokenizer",
    "smollm2_tokenizer",
    "qwen25_tokenizer",
    "qwen7b_tokenizer",
    "stories_tokenizer",
]
# Rare CJK characters, emoji with modifiers and flags: split into several byte tokens by these vocabularies.
MULTI_BYTE_TEXT = "你好，世界！鱻𠀋𪚥龘 🙂👍🏽🇨🇳👨‍👩‍👧 こんにちは 안녕하세요 Ünïcödé — done."


@pytest.fixture(params=TOKENIZERS)
def tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def stream(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


def test_multi_byte_characters_are_never_split(tokenizer):
    ids = tokenizer.encode(MULTI_BYTE_TEXT)
    # The text really does put characters across tokens, or this test would prove nothing.
    assert any("\ufffd" in tokenizer.decode([token_id]) for token_id in ids)
    pieces = stream(tokenizer, ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == MULTI_BYTE_TEXT
    assert sum(1 for piece in pieces if piece) > 10  # streamed as it goes, not all at the end


def test_special_tokens_in_the_stream_are_skipped(tiny_chat_tokenizer, tiny_spm_tokenizer):
    for tokenizer, text in [
        (tiny_chat_tokenizer, "<|im_start|>assistant\n𠀋 and 🙂<|im_end|>\n<|endoftext|> after"),
        (tiny_spm_tokenizer, "<s> Once</s> upon<s> 你</s> a time"),
    ]:
        ids = tokenizer.encode(text)
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_incomplete_tail_is_held_back_until_flush(tiny_chat_tokenizer):
    ids = tiny_chat_tokenizer.encode("a𠀋")
    decoder = StreamDecoder(tiny_chat_tokenizer)
    assert decoder.push(ids[0]) == "a"
    assert [decoder.push(token_id) for token_id in ids[1:-1]] == [""] * (len(ids) - 2)
    # Ended before the character's last byte arrived: the unfinished character is dropped.
    assert tiny_chat_tokenizer.decode(ids[:-1])[1:] == "\ufffd"
    assert decoder.flush() == ""


def test_each_step_decodes_a_short_window(tiny_chat_tokenizer):
    window_lengths: list[int] = []

    class RecordingTokenizer:
        byte_token_ids = tiny_chat_tokenizer.byte_token_ids
        special_token_ids = tiny_chat_tokenizer.special_token_ids

        def decode(self, ids: Sequence[int]) -> str:
            window_lengths.append(len(ids))
            return tiny_chat_tokenizer.decode(ids)

    ids = tiny_chat_tokenizer.encode(MULTI_BYTE_TEXT * 20)
    decoder = StreamDecoder(RecordingTokenizer())
    text = "".join([decoder.push(token_id) for token_id in ids] + [decoder.flush()])
    assert text == MULTI_BYTE_TEXT * 20
    assert len(ids) > 500
    assert max(window_lengths) <= 12


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TEXT = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from("你好世界鱻龘𠀋𪚥🙂👍🏽🇨🇳 \n")),
    max_size=60,
)


@FUZZ
@given(text=TEXT)
def test_pieces_add_up_to_the_whole_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids)
    whole = tokenizer.decode(ids)
    assert "".join(pieces) == whole.rstrip("\ufffd")
    # (A vocabulary may lack some bytes, e.g. SmolLM2 has no 0xF1: then the whole decode has U+FFFD too.)
    if "\ufffd" not in whole:
        assert all("\ufffd" not in piece for piece in pieces)


@FUZZ
@given(data=st.data())
def test_any_id_sequence_streams_to_its_whole_decode(tokenizer, data):
    # What a model emits need not be valid text (stray continuation bytes, byte runs cut by specials).
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=24))
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids).rstrip("\ufffd")
