"""Qwen-7B v1's tokenizer (`qwen.tiktoken` ranks) rebuilt as a `tokenizers` byte-level BPE.

tiktoken joins, at each step, the adjacent pair whose concatenation has the lowest rank, and takes a
whole word directly when it is a token; a BPE with merges ordered by result rank and `ignore_merges`
does the same. Special tokens follow the ranks, in the order Qwen's tokenization_qwen.py defines.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from worker.core.bpe import (
    SplitStyle,
    add_tokens_at_ids,
    byte_level_tokenizer,
    byte_to_unicode,
    merges_from_ranks,
)

QWEN_TIKTOKEN_FILE = "qwen.tiktoken"
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
# Qwen v1 chat ends a turn with <|im_end|>; <|endoftext|> ends a document. Either stops generation.
QWEN_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """`base64-token rank` lines, as tiktoken stores a BPE vocabulary."""
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(path.read_text(encoding="ascii").splitlines(), start=1):
        if not line:
            continue
        try:
            encoded, rank = line.split()
            ranks[base64.b64decode(encoded, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise ValueError(
                f"{path}:{line_number}: expected '<base64 token> <rank>', got {line[:80]!r}"
            ) from exc
    return ranks


def qwen_tiktoken_tokenizer(path: Path) -> BackendTokenizer:
    ranks = read_tiktoken_ranks(path)
    missing_bytes = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing_bytes:
        raise ValueError(
            f"{path}: not a byte-level vocabulary, {len(missing_bytes)} single bytes have no rank"
        )
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be the distinct numbers 0..{len(ranks) - 1}")
    alphabet = byte_to_unicode()
    vocab = {"".join(alphabet[byte] for byte in token): rank for token, rank in ranks.items()}
    model = BPE(vocab=vocab, merges=merges_from_ranks(vocab), ignore_merges=True)
    tokenizer = byte_level_tokenizer(model, SplitStyle.QWEN2)
    specials = [
        (len(ranks) + offset, AddedToken(content, special=True, normalized=False))
        for offset, content in enumerate(QWEN_SPECIAL_TOKENS)
    ]
    add_tokens_at_ids(tokenizer, specials, str(path))
    return tokenizer
