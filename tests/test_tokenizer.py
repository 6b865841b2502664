"""Tokenizer loading from every accepted source, checked against independent oracles where we have one."""

from __future__ import annotations

import base64
import json
import locale
import re
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, processors, trainers

from worker.core.builtin_model import builtin_model_path
from worker.core.request import USER, RequestError, Turn
from worker.core.tokenizer import Tokenizer, load_tokenizer

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "你好，世界！很高兴见到你。",
    "🙂👍🏽 emoji and 𠀋𪚥 rare CJK",
    "def f(x):\n    return x**2  # 平方\r\n\ttabs   spaces",
    "numbers 2024 and 3.14159",
]


def test_qwen7b_tiktoken_gives_the_ids_tiktoken_gives(fixtures_dir, qwen7b_tokenizer):
    cases = json.loads((fixtures_dir / "qwen-7b-token_config" / "expected_ids.json").read_text())
    assert len(cases) >= 6
    mismatches = [
        (case["text"], qwen7b_tokenizer.encode(case["text"]), case["ids"])
        for case in cases
        if qwen7b_tokenizer.encode(case["text"]) != case["ids"]
    ]
    assert mismatches == []


def test_qwen7b_special_tokens_end_ids_and_fallback_template(qwen7b_tokenizer):
    specials = "<|endoftext|><|im_start|><|im_end|><|extra_0|><|extra_204|>"
    assert qwen7b_tokenizer.encode(specials) == [151643, 151644, 151645, 151646, 151850]
    assert qwen7b_tokenizer.eos_token_ids == {151643, 151645}
    assert qwen7b_tokenizer.vocab_size == 151643 + 208
    assert (
        qwen7b_tokenizer.decode(qwen7b_tokenizer.encode("<|im_start|>user\n你好<|im_end|>")) == "user\n你好"
    )
    assert qwen7b_tokenizer.chat_template.origin == "ChatML fallback"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_qwen_tokenizers_round_trip_and_agree(qwen7b_tokenizer, qwen25_tokenizer, text):
    # Qwen2.5 kept Qwen-7B's vocabulary and split rules: vocab+merges and tiktoken ranks must agree.
    ids = qwen25_tokenizer.encode(text)
    assert ids == qwen7b_tokenizer.encode(text)
    assert qwen25_tokenizer.decode(ids) == text


def test_qwen25_vocab_merges_specials_end_ids_and_real_template(fixtures_dir, qwen25_tokenizer):
    config = json.loads((fixtures_dir / "qwen2.5-tokenizer" / "tokenizer_config.json").read_text())
    for token_id, entry in config["added_tokens_decoder"].items():
        assert qwen25_tokenizer.encode(entry["content"]) == [int(token_id)], entry["content"]
    assert qwen25_tokenizer.eos_token_ids == {151643, 151645}
    assert qwen25_tokenizer.vocab_size == 151643 + len(config["added_tokens_decoder"])
    assert not qwen25_tokenizer.add_bos_token

    prompt = qwen25_tokenizer.chat_template.render("You are a helpful assistant.", [Turn(USER, "你好")])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )
    expected = json.loads((fixtures_dir / "qwen-7b-token_config" / "expected_ids.json").read_text())
    assert qwen25_tokenizer.encode(prompt) == next(case["ids"] for case in expected if case["text"] == prompt)
    # Special tokens are skipped in decoded text, ordinary added tokens such as <tool_call> are kept.
    assert qwen25_tokenizer.decode([151644, 151657, 108386, 151645]) == "<tool_call>你好"


def test_tiktoken_ranks_folder_gets_qwen_specials_end_ids_and_fallback_template(tmp_path):
    multi_byte = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b"ld", b"orld", b" world"]
    multi_byte += ["你".encode()[:2], "你".encode()]
    ranks = [bytes([byte]) for byte in range(256)] + multi_byte
    (tmp_path / "qwen.tiktoken").write_text(
        "".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranks))
    )
    tokenizer = load_tokenizer(tmp_path)
    base = len(ranks)

    assert tokenizer.encode("hello world你") == [ranks.index(b"hello"), ranks.index(b" world"), base - 1]
    specials = "<|endoftext|><|im_start|><|im_end|><|extra_0|><|extra_204|>"
    assert tokenizer.encode(specials) == [base, base + 1, base + 2, base + 3, base + 207]
    assert tokenizer.eos_token_ids == {base, base + 2}
    assert tokenizer.vocab_size == base + 208
    assert tokenizer.decode(tokenizer.encode("<|im_start|>user\n你好<|im_end|>")) == "user\n你好"
    assert tokenizer.chat_template.origin == "ChatML fallback"
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_json_folder_with_byte_fallback(tiny_spm_tokenizer):
    assert tiny_spm_tokenizer.bos_token_id == 1
    assert tiny_spm_tokenizer.eos_token_ids == {2}
    assert tiny_spm_tokenizer.add_bos_token  # its post-processor adds <s>: prompts need it too
    ids = tiny_spm_tokenizer.encode("Once upon a time")
    assert ids[0] != 1
    assert tiny_spm_tokenizer.encode_prompt("Once upon a time") == [1, *ids]
    # A template that writes BOS itself gets no second one (a double BOS changes a Llama's answer).
    assert tiny_spm_tokenizer.encode_prompt("<s>Once upon a time") == [1, *ids]
    assert tiny_spm_tokenizer.decode(tiny_spm_tokenizer.encode("Lily 你好 🙂")) == "Lily 你好 🙂"
    assert len(tiny_spm_tokenizer.encode("你")) == 1 + 3  # "▁" and three <0xNN> byte tokens
    assert len(tiny_spm_tokenizer.byte_token_ids) == 256


def test_vocab_json_and_merges_txt_folder(tmp_path):
    vocab = train_tiny_byte_level_bpe(tmp_path)
    base = len(vocab)
    write_json(
        tmp_path / "tokenizer_config.json",
        {
            "added_tokens_decoder": {
                str(base): {"content": "<|im_start|>", "special": True},
                str(base + 1): {"content": "<|im_end|>", "special": True},
                str(base + 2): {"content": "<tool_call>", "special": False},
            },
            "eos_token": "<|im_end|>",
            "chat_template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
        },
    )
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("hello world") == [vocab["hello"], vocab["Ġworld"]]
    assert tokenizer.encode("<|im_start|>hello<|im_end|>") == [base, vocab["hello"], base + 1]
    assert tokenizer.decode([base, vocab["hello"], base + 2, base + 1]) == "hello<tool_call>"
    assert tokenizer.eos_token_ids == {base + 1}
    assert tokenizer.vocab_size == base + 3
    assert tokenizer.chat_template.render("", [Turn(USER, "hi")]) == "[user]hi"


def test_a_chat_template_file_beside_the_config_wins_over_the_config_jinja_first(tmp_path):
    """Newer transformers save chat_template.jinja (or chat_template.json) beside tokenizer_config.json."""
    train_tiny_byte_level_bpe(tmp_path)
    config = {"eos_token": "hello", "chat_template": "config:{{ messages[0].content }}", "bos_token": "B"}
    write_json(tmp_path / "tokenizer_config.json", config)
    turns = [Turn(USER, "hi 你好")]
    assert load_tokenizer(tmp_path).chat_template.render("", turns) == "config:hi 你好"
    write_json(
        tmp_path / "chat_template.json", {"chat_template": "json:{{ bos_token }}{{ messages[0].content }}"}
    )
    assert load_tokenizer(tmp_path).chat_template.render("", turns) == "json:Bhi 你好"
    (tmp_path / "chat_template.jinja").write_text("jinja:{{ messages[0].content }}", encoding="utf-8")
    assert load_tokenizer(tmp_path).chat_template.render("", turns) == "jinja:hi 你好"
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no') }}", encoding="utf-8")
    with pytest.raises(RequestError, match=re.escape(str(tmp_path / "chat_template.jinja"))):
        load_tokenizer(tmp_path).chat_template.render("", turns)
    (tmp_path / "chat_template.jinja").unlink()
    write_json(tmp_path / "chat_template.json", {"chat_template": 42})
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path / 'chat_template.json'}: chat_template must be")
    ):
        load_tokenizer(tmp_path)


def test_folder_without_end_token_is_refused(tmp_path):
    train_tiny_byte_level_bpe(tmp_path)
    with pytest.raises(ValueError, match="no end-of-sequence token declared"):
        load_tokenizer(tmp_path)


def test_gguf_byte_level_tokenizer_of_the_builtin_model(smollm2_tokenizer):
    assert smollm2_tokenizer.bos_token_id == 1
    assert {2, 0} <= smollm2_tokenizer.eos_token_ids  # <|im_end|> (declared EOS) and <|endoftext|>
    assert smollm2_tokenizer.vocab_size == 49152
    assert smollm2_tokenizer.encode("<|im_start|>user<|im_end|>")[::2] == [1, 2]
    for text in ROUND_TRIP_TEXTS:
        assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text)) == text
    # SmolLM's pre-tokenizer ("smollm" in the GGUF) puts every digit in a token of its own.
    digits = smollm2_tokenizer.encode("2024")
    assert [smollm2_tokenizer.decode([token]) for token in digits] == ["2", "0", "2", "4"]
    prompt = smollm2_tokenizer.chat_template.render("", [Turn(USER, "Hi")])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_gguf_sentencepiece_tokenizer_matches_the_same_vocab_as_tokenizer_json(
    tmp_path, fixtures_dir, stories_tokenizer
):
    # llama2.c's tok512.bin (pieces and scores of the SentencePiece model) written as a "llama" GGUF
    # vocabulary must tokenize like the tokenizer.json converted independently from the same model.
    path = write_sentencepiece_gguf(
        fixtures_dir / "stories260K" / "llama2c" / "tok512.bin", tmp_path / "spm.gguf"
    )
    tokenizer = load_tokenizer(path)
    texts = [
        *ROUND_TRIP_TEXTS,
        "Once upon a time, there was a little girl named Lily.",
        "  leading spaces and\nnew lines\n\n",
        "<s>special</s> tokens",
    ]
    for text in texts:
        assert tokenizer.encode(text) == stories_tokenizer.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == stories_tokenizer.decode(
            stories_tokenizer.encode(text)
        )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.add_bos_token) == (1, {2}, True)


def test_builtin_model_path():
    path = builtin_model_path()
    assert path.is_file() and path.suffix == ".gguf"
    with pytest.raises(ValueError, match="unknown builtin model 'nope'"):
        builtin_model_path("nope")


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(
        FileNotFoundError, match=r"no tokenizer found; expected tokenizer\.json, or vocab\.json"
    ):
        load_tokenizer(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"neither a token_config / model folder nor a \.gguf file"):
        load_tokenizer(tmp_path / "notes.txt")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(tmp_path)


def test_gguf_without_a_usable_tokenizer_is_refused(tmp_path):
    bare = write_gguf(tmp_path / "bare.gguf", lambda writer: None)
    with pytest.raises(ValueError, match=r"bare\.gguf: no tokenizer in this GGUF file"):
        load_tokenizer(bare)

    def falcon_split(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("falcon")
        writer.add_token_list(["a", "b", "ab"])
        writer.add_token_merges(["a b"])

    with pytest.raises(ValueError, match="pre-tokenizer 'falcon' is not supported"):
        load_tokenizer(write_gguf(tmp_path / "falcon.gguf", falcon_split))

    def wordpiece(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("bert")
        writer.add_token_list(["[UNK]", "a"])

    with pytest.raises(ValueError, match="tokenizer model 'bert' is not supported"):
        load_tokenizer(write_gguf(tmp_path / "bert.gguf", wordpiece))


def train_tiny_byte_level_bpe(folder: Path) -> dict[str, int]:
    """vocab.json + merges.txt of a small byte-level BPE trained here; returns the vocabulary."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["hello world, hello there"] * 50 + ["the quick brown fox"] * 20, trainer)
    backend.model.save(str(folder))
    return json.loads((folder / "vocab.json").read_text(encoding="utf-8"))


def write_sentencepiece_gguf(llama2c_tokenizer: Path, path: Path) -> Path:
    """llama2.c's tokenizer.bin (int32 max length, then per token: f32 score, int32 length, bytes) as GGUF.

    llama2.c wrote spaces for "▁" and "\\n<s>\\n" / "\\n</s>\\n" for BOS/EOS; undo that.
    """
    data = llama2c_tokenizer.read_bytes()
    offset, pieces, scores = 4, [], []
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8 : offset + 8 + length].decode("utf-8").replace(" ", "▁"))
        scores.append(score)
        offset += 8 + length
    pieces[1:3] = ["<s>", "</s>"]
    kinds = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    kinds += [
        gguf.TokenType.BYTE if piece.startswith("<0x") else gguf.TokenType.NORMAL for piece in pieces[3:]
    ]

    def vocabulary(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(kinds)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)

    return write_gguf(path, vocabulary)


def write_gguf(path: Path, add_metadata) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    add_metadata(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content), encoding="utf-8")


@pytest.mark.parametrize("flag", ["lstrip", "rstrip", "single_word", "special"])
def test_the_flags_of_added_tokens_in_tokenizer_config_are_honoured(tmp_path, flag):
    vocab = train_tiny_byte_level_bpe(tmp_path)
    marker = len(vocab)

    def loaded(**flags: bool) -> Tokenizer:
        entry = {"content": "<x>", "special": False, **flags}
        write_json(
            tmp_path / "tokenizer_config.json",
            {"added_tokens_decoder": {str(marker): entry}, "eos_token": "<x>"},
        )
        return load_tokenizer(tmp_path)

    plain, flagged = loaded(), loaded(**{flag: True})
    hello, world = plain.encode("hello"), plain.encode("world")
    if flag == "lstrip":  # the space before the token goes with it
        assert flagged.encode("hello <x>") == [*hello, marker] != plain.encode("hello <x>")
    elif flag == "rstrip":  # the space after it too
        assert flagged.encode("<x> world") == [marker, *world] != plain.encode("<x> world")
    elif flag == "single_word":  # only as a word of its own
        assert marker not in flagged.encode("hello<x>world") and marker in plain.encode("hello<x>world")
    else:  # special tokens are left out of decoded text
        assert flagged.decode([*hello, marker]) == "hello" and plain.decode([*hello, marker]) == "hello<x>"


# Loading paths pinned against mutation testing (scripts/mutate.py): which file each setting is read
# from, which source wins, and the exact messages an operator reads when a folder is refused.


def write_added_tokens_folder(folder: Path, **config: object) -> tuple[dict[str, int], int]:
    """vocab.json + merges.txt with <|endoftext|>, <|im_start|>, <|im_end|> added after the vocabulary."""
    vocab = train_tiny_byte_level_bpe(folder)
    base = len(vocab)
    added = {
        str(base): {"content": "<|endoftext|>", "special": True},
        str(base + 1): {"content": "<|im_start|>", "special": True},
        str(base + 2): {"content": "<|im_end|>", "special": True},
    }
    write_json(folder / "tokenizer_config.json", {"added_tokens_decoder": added, **config})
    return vocab, base


def test_end_ids_are_merged_from_every_config_and_bos_comes_from_the_most_specific(tmp_path):
    vocab, base = write_added_tokens_folder(
        tmp_path,
        # the AddedToken form older transformers wrote
        eos_token={"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        bos_token={"__type": "AddedToken", "content": "<|im_start|>", "special": True},
    )
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [base, base + 2]})
    write_json(tmp_path / "config.json", {"bos_token_id": 0, "eos_token_id": base + 2})
    # The stale config.json BOS would come first out of a set of both ids: only the first source counts.
    assert next(iter({base + 1, 0})) == 0
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.eos_token_ids == {base, base + 2}
    assert tokenizer.bos_token_id == base + 1
    assert tokenizer.special_token_ids == {base, base + 1, base + 2}
    assert not tokenizer.add_bos_token  # no post-processor puts BOS first, and the config does not ask
    assert tokenizer.encode_prompt("hello") == [vocab["hello"]]


def test_a_token_setting_that_is_not_text_is_ignored(tmp_path):
    _, base = write_added_tokens_folder(tmp_path, eos_token="<|im_end|>", bos_token=1)
    tokenizer = load_tokenizer(tmp_path)
    assert (tokenizer.eos_token_ids, tokenizer.bos_token_id) == ({base + 2}, None)


def test_special_tokens_missing_from_the_vocabulary_are_named(tmp_path):
    write_added_tokens_folder(tmp_path, eos_token="<|eot_id|>")
    message = f"{tmp_path}: special token '<|eot_id|>' named in the config is not in the vocabulary"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_tokenizer(tmp_path)
    write_added_tokens_folder(tmp_path, eos_token="<|im_end|>", bos_token="<s>")
    message = f"{tmp_path}: special token '<s>' named in the config is not in the vocabulary"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_tokenizer(tmp_path)


def test_refused_folders_get_the_exact_message(tmp_path):
    train_tiny_byte_level_bpe(tmp_path)
    message = (
        f"{tmp_path}: no end-of-sequence token declared (eos_token in tokenizer_config.json "
        "or eos_token_id in generation_config.json / config.json)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_tokenizer(tmp_path)

    (tmp_path / "tokenizer_config.json").write_text("[]", encoding="utf-8")
    message = f"{tmp_path / 'tokenizer_config.json'}: expected a JSON object"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_tokenizer(tmp_path)

    (tmp_path / "merges.txt").unlink()  # vocab.json alone is not a tokenizer
    (tmp_path / "tokenizer_config.json").unlink()
    message = (
        f"{tmp_path}: no tokenizer found; expected tokenizer.json, or vocab.json + merges.txt, "
        "or qwen.tiktoken"
    )
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        load_tokenizer(tmp_path)


def test_added_tokens_that_skip_ids_are_refused_naming_the_config_file(tmp_path):
    base = len(train_tiny_byte_level_bpe(tmp_path))
    write_json(
        tmp_path / "tokenizer_config.json",
        {"added_tokens_decoder": {str(base + 5): {"content": "<|im_end|>", "special": True}}},
    )
    message = (
        f"{tmp_path / 'tokenizer_config.json'}: added token '<|im_end|>' is declared with id {base + 5} "
        f"but the vocabulary gives it id {base}; the added tokens do not continue the vocabulary"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_tokenizer(tmp_path)


def test_vocab_and_merges_folder_normalizes_to_nfc_like_qwen2(tmp_path):
    write_added_tokens_folder(tmp_path, eos_token="<|im_end|>")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("cafe\u0301") == tokenizer.encode("caf\u00e9")  # é decomposed, then composed
    assert tokenizer.decode(tokenizer.encode("cafe\u0301")) == "caf\u00e9"


@pytest.mark.parametrize("normalized", [None, False, True])
def test_the_normalized_flag_of_added_tokens_is_honoured(tmp_path, normalized):
    """A normalized added token also matches text that only equals it after NFC; by default it does not."""
    vocab = train_tiny_byte_level_bpe(tmp_path)
    marker = len(vocab)
    entry = {"content": "<\u00c5>"} | ({} if normalized is None else {"normalized": normalized})
    write_json(
        tmp_path / "tokenizer_config.json",
        {"added_tokens_decoder": {str(marker): entry}, "eos_token": "<\u00c5>"},
    )
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("<\u00c5>") == [marker]
    assert (tokenizer.encode("<A\u030a>") == [marker]) is bool(normalized)
    # Without "special" an added token is an ordinary one, which decoded text keeps.
    assert tokenizer.special_token_ids == set()


def write_bos_eos_post_processor_folder(folder: Path, **config: object) -> Path:
    """tokenizer.json whose post-processor wraps text in <s> ... </s> (ids 0 and 1)."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["hello world, hello there"] * 50, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    backend.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>", **config})
    return folder


def test_bos_is_added_when_the_post_processor_puts_it_first_unless_the_config_says_no(tmp_path):
    tokenizer = load_tokenizer(write_bos_eos_post_processor_folder(tmp_path))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.add_bos_token) == (0, {1}, True)
    hello = tokenizer.encode("hello")
    assert hello[0] != 0
    assert tokenizer.encode_prompt("hello") == [0, *hello]

    tokenizer = load_tokenizer(write_bos_eos_post_processor_folder(tmp_path, add_bos_token=False))
    assert not tokenizer.add_bos_token
    assert tokenizer.encode_prompt("hello") == hello


def test_a_chat_template_in_tokenizer_config_names_that_file(tmp_path):
    write_added_tokens_folder(tmp_path, eos_token="<|im_end|>", chat_template="{{ messages[0].content }}")
    config_file = str(tmp_path / "tokenizer_config.json")
    assert load_tokenizer(tmp_path).chat_template.origin == config_file
    write_added_tokens_folder(tmp_path, eos_token="<|im_end|>", chat_template=42)
    message = (
        f"{config_file}: chat_template must be a string or a list of {{name, template}}, got <class 'int'>"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_tokenizer(tmp_path)


@pytest.fixture
def ascii_locale() -> Iterator[None]:
    """The host's locale encoding is ASCII (e.g. a service started without a UTF-8 locale)."""
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)


def test_configs_and_template_files_are_read_as_utf8_whatever_the_locale(tmp_path, ascii_locale):
    if sys.flags.utf8_mode or locale.getpreferredencoding(False).lower() == "utf-8":
        pytest.skip("Python runs in UTF-8 mode here: the locale encoding cannot be made ASCII")
    template = "你好 {{ messages[0].content }}"
    write_added_tokens_folder(tmp_path, eos_token="<|im_end|>", chat_template=template)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # Raw UTF-8 as real configs have it, not the \uXXXX escapes json.dumps writes by default.
    config_file.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    assert "你好".encode() in config_file.read_bytes()
    assert load_tokenizer(tmp_path).chat_template.render("", [Turn(USER, "世界")]) == "你好 世界"
    (tmp_path / "chat_template.jinja").write_text("再见 {{ messages[0].content }}", encoding="utf-8")
    assert load_tokenizer(tmp_path).chat_template.render("", [Turn(USER, "世界")]) == "再见 世界"


def test_gguf_chat_template_gets_the_special_token_texts_and_names_its_origin(tmp_path):
    def vocabulary(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["<s>", "</s>", "<unk>", "<pad>", "a", "b", "ab"])
        writer.add_token_types([gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL] * 3)
        writer.add_token_merges(["a b"])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(2)
        writer.add_pad_token_id(3)
        writer.add_chat_template(
            "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ messages[0].content }}"
        )

    path = write_gguf(tmp_path / "templated.gguf", vocabulary)
    tokenizer = load_tokenizer(path)
    assert tokenizer.chat_template.render("", [Turn(USER, "ab")]) == "<s>|</s>|<unk>|<pad>|ab"
    assert tokenizer.chat_template.origin == f"{path} (tokenizer.chat_template)"
    assert tokenizer.encode("ab") == [6]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids) == (0, {1})
