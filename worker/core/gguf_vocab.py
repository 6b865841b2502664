"""The tokenizer stored in a GGUF file's `tokenizer.*` metadata, rebuilt for the `tokenizers` library.

Handles llama.cpp's two BPE flavours: "gpt2" (byte-level, merges listed) and "llama" (SentencePiece
BPE with byte fallback, merges implied by the token scores). Which split rules a "gpt2" vocabulary
needs is named by `tokenizer.ggml.pre`, as llama.cpp reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from worker.core.bpe import (
    SplitStyle,
    add_tokens_at_ids,
    byte_level_tokenizer,
    merges_from_ranks,
    sentencepiece_bpe_tokenizer,
)

KEYS = gguf.Keys.Tokenizer
PRE_TOKENIZER_STYLES = {
    "default": SplitStyle.GPT2,
    "gpt-2": SplitStyle.GPT2,
    "qwen2": SplitStyle.QWEN2,
    "llama3": SplitStyle.LLAMA3,
    "llama-v3": SplitStyle.LLAMA3,
    "llama-bpe": SplitStyle.LLAMA3,
    "smollm": SplitStyle.GPT2_SINGLE_DIGITS,
    "starcoder": SplitStyle.GPT2_SINGLE_DIGITS,
    "refact": SplitStyle.GPT2_SINGLE_DIGITS,
}
# Control tokens that end a turn in common chat formats; llama.cpp stops on them too even when the
# file names another token as EOS (e.g. an instruct model whose eos is <|endoftext|>).
END_OF_TURN_TOKENS = frozenset(
    {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>"}
)
SPECIAL_ID_KEYS = {
    "bos": KEYS.BOS_ID,
    "eos": KEYS.EOS_ID,
    "eot": KEYS.EOT_ID,
    "eom": KEYS.EOM_ID,
    "unk": KEYS.UNK_ID,
    "pad": KEYS.PAD_ID,
}


@dataclass(frozen=True)
class GgufVocab:
    origin: str  # the file, for error messages
    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    scores: list[float]
    merges: list[str]  # "left right"
    special_ids: dict[str, int]  # the SPECIAL_ID_KEYS present in the file
    add_bos: bool
    add_space_prefix: bool
    chat_template: str | None
    embedded_tokenizer_json: str | None  # tokenizer.huggingface.json, when the converter stored it


def read_gguf_vocab(reader: gguf.GGUFReader, origin: str) -> GgufVocab:
    def value(key: str, default: object = None) -> object:
        field = reader.get_field(key)
        return default if field is None else field.contents()

    model = value(KEYS.MODEL)
    tokens = value(KEYS.LIST)
    if model is None or tokens is None:
        raise ValueError(f"{origin}: no tokenizer in this GGUF file ({KEYS.MODEL} / {KEYS.LIST} missing)")
    token_types = value(KEYS.TOKEN_TYPE) or [gguf.TokenType.NORMAL] * len(tokens)
    declared_ids = {name: value(key) for name, key in SPECIAL_ID_KEYS.items()}
    special_ids = {name: int(token_id) for name, token_id in declared_ids.items() if token_id is not None}
    return GgufVocab(
        origin=origin,
        model=str(model),
        pre=str(value(KEYS.PRE, "default")),
        tokens=list(tokens),
        token_types=[int(kind) for kind in token_types],
        scores=list(value(KEYS.SCORES) or []),
        merges=list(value(KEYS.MERGES) or []),
        special_ids=special_ids,
        add_bos=bool(value(KEYS.ADD_BOS, False)),
        add_space_prefix=bool(value(KEYS.ADD_PREFIX, True)),
        chat_template=value(KEYS.CHAT_TEMPLATE),
        embedded_tokenizer_json=value(KEYS.HF_JSON),
    )


def gguf_backend(vocab: GgufVocab) -> BackendTokenizer:
    if vocab.embedded_tokenizer_json:
        return BackendTokenizer.from_str(vocab.embedded_tokenizer_json)
    if vocab.model == "gpt2":
        backend = _byte_level_backend(vocab)
    elif vocab.model == "llama":
        backend = _sentencepiece_backend(vocab)
    else:
        raise ValueError(
            f"{vocab.origin}: tokenizer model {vocab.model!r} is not supported (supported: 'gpt2', 'llama')"
        )
    added = [
        (token_id, AddedToken(token, special=kind != gguf.TokenType.USER_DEFINED, normalized=False))
        for token_id, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types, strict=True))
        if kind in (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN, gguf.TokenType.USER_DEFINED)
    ]
    add_tokens_at_ids(backend, added, vocab.origin)
    return backend


def end_of_generation_ids(vocab: GgufVocab) -> frozenset[int]:
    declared = {vocab.special_ids[name] for name in ("eos", "eot", "eom") if name in vocab.special_ids}
    turn_ends = {
        token_id
        for token_id, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types, strict=True))
        if kind == gguf.TokenType.CONTROL and token in END_OF_TURN_TOKENS
    }
    return frozenset(declared | turn_ends)


def _byte_level_backend(vocab: GgufVocab) -> BackendTokenizer:
    style = PRE_TOKENIZER_STYLES.get(vocab.pre)
    if style is None:
        raise ValueError(
            f"{vocab.origin}: pre-tokenizer {vocab.pre!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZER_STYLES))})"
        )
    merges = []
    for merge in vocab.merges:
        left, space, right = merge.partition(" ")
        if not space or not left or not right:
            raise ValueError(f"{vocab.origin}: malformed merge {merge!r}, expected 'left right'")
        merges.append((left, right))
    ids = {token: token_id for token_id, token in enumerate(vocab.tokens)}
    return byte_level_tokenizer(BPE(vocab=ids, merges=merges), style)


def _sentencepiece_backend(vocab: GgufVocab) -> BackendTokenizer:
    if len(vocab.scores) != len(vocab.tokens):
        raise ValueError(f"{vocab.origin}: a 'llama' tokenizer needs one score per token ({KEYS.SCORES})")
    if "unk" not in vocab.special_ids:
        raise ValueError(f"{vocab.origin}: a 'llama' tokenizer needs {KEYS.UNK_ID}")
    # SentencePiece BPE joins the adjacent pair whose result scores highest; only normal pieces merge.
    normal = [token_id for token_id, kind in enumerate(vocab.token_types) if kind == gguf.TokenType.NORMAL]
    by_score = sorted(normal, key=lambda token_id: (-vocab.scores[token_id], token_id))
    ranks = {vocab.tokens[token_id]: rank for rank, token_id in enumerate(by_score)}
    model = BPE(
        vocab={token: token_id for token_id, token in enumerate(vocab.tokens)},
        merges=merges_from_ranks(ranks),
        unk_token=vocab.tokens[vocab.special_ids["unk"]],
        fuse_unk=True,
        byte_fallback=True,
    )
    return sentencepiece_bpe_tokenizer(model, add_space_prefix=vocab.add_space_prefix)
