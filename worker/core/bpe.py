"""Assembling `tokenizers` BPE pipelines from raw vocabularies (tiktoken ranks, vocab+merges, GGUF lists).

One place for the byte-level alphabet, the pre-tokenizer split rules of the model families we serve,
and the derivation of merges from a ranked vocabulary.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

# Qwen (v1 tiktoken and Qwen2/2.5) pre-tokenizer: single digits, letters with one leading mark, etc.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Llama 3: the same but digits in groups of up to three.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


class SplitStyle(enum.Enum):
    """How a byte-level BPE cuts text into words before merging."""

    GPT2 = "gpt2"  # the GPT-2 regex built into the ByteLevel pre-tokenizer
    QWEN2 = "qwen2"  # NFC, then QWEN2_SPLIT
    LLAMA3 = "llama3"
    GPT2_SINGLE_DIGITS = "gpt2-single-digits"  # StarCoder / SmolLM: every digit alone, then GPT-2


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, the alphabet of byte-level vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def merges_from_ranks(ranks: Mapping[str, int]) -> list[tuple[str, str]]:
    """Merges making BPE "join the adjacent pair whose result ranks best", as tiktoken and SentencePiece do.

    Every way of writing a token as two tokens becomes a merge, ordered by the rank of the result.
    """
    found: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                found.append((rank, left_rank, right_rank, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def byte_level_tokenizer(model: BPE, style: SplitStyle) -> BackendTokenizer:
    """A byte-level BPE pipeline (GPT-2 alphabet) with the given split rules."""
    tokenizer = BackendTokenizer(model)
    if style is SplitStyle.GPT2:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif style is SplitStyle.GPT2_SINGLE_DIGITS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        pattern = QWEN2_SPLIT if style is SplitStyle.QWEN2 else LLAMA3_SPLIT
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if style is SplitStyle.QWEN2:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_bpe_tokenizer(model: BPE, *, add_space_prefix: bool) -> BackendTokenizer:
    """A SentencePiece-style BPE pipeline (spaces written as "▁", unknown characters as <0xNN> bytes)."""
    tokenizer = BackendTokenizer(model)
    space_rules = [normalizers.Replace(" ", "▁")]
    decoder_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        space_rules.insert(0, normalizers.Prepend("▁"))
        decoder_steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.normalizer = normalizers.Sequence(space_rules)
    tokenizer.decoder = decoders.Sequence(decoder_steps)
    return tokenizer


def add_tokens_at_ids(
    tokenizer: BackendTokenizer, tokens: Iterable[tuple[int, AddedToken]], origin: str
) -> None:
    """Register added/special tokens and check each lands on the id its source declares.

    New tokens get the next free ids in order, so the declared ids must continue the vocabulary.
    """
    ordered = sorted(tokens, key=lambda entry: entry[0])
    tokenizer.add_tokens([token for _, token in ordered])
    for token_id, token in ordered:
        actual = tokenizer.token_to_id(token.content)
        if actual != token_id:
            raise ValueError(
                f"{origin}: added token {token.content!r} is declared with id {token_id} but the vocabulary "
                f"gives it id {actual}; the added tokens do not continue the vocabulary"
            )
