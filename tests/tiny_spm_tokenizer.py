"""A tiny Llama-style SentencePiece BPE tokenizer folder with byte fallback, trained by the tests.

Built like the `tokenizer.json` of Llama-family models (stories260K, Llama 2): spaces become "▁"
and one is prepended, pieces never span a "▁" word start, characters outside the vocabulary fall
back to <0xNN> byte tokens, the decoder strips the prepended space, and the post-processor puts <s>
first. Trained on a few lines of English only, so any CJK character or emoji is a byte-token run.
Ids: <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258, then the learned pieces.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BOS_ID, EOS_ID = 1, 2
BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
LEARNED_PIECES = 120
CORPUS = [
    "Once upon a time, there was a little girl named Lily.",
    "She liked to play in the park with her dog and her friends.",
    "One day the sun was hot and the birds sang a happy song.",
] * 4


def write_tiny_spm_tokenizer(folder: Path) -> Path:
    """tokenizer.json, and config.json declaring BOS and EOS by id (as a Llama checkpoint's does)."""
    folder.mkdir(parents=True, exist_ok=True)
    _byte_fallback_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(
        json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}), encoding="utf-8"
    )
    return folder


def _byte_fallback_tokenizer() -> Tokenizer:
    pieces, merges = _learned_pieces_and_merges()
    vocab = {piece: token_id for token_id, piece in enumerate((*SPECIAL_TOKENS, *BYTE_TOKENS, *pieces))}
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = _metaspace_normalizer()
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS_ID)]
    )
    return tokenizer


def _learned_pieces_and_merges() -> tuple[list[str], list[tuple[str, str]]]:
    """BPE pieces learned within words ("▁" starts a word), in id order, and their merges."""
    trainer_side = Tokenizer(models.BPE())
    trainer_side.normalizer = _metaspace_normalizer()
    trainer_side.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trainer_side.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=LEARNED_PIECES, show_progress=False)
    )
    model = json.loads(trainer_side.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    return pieces, [tuple(merge) for merge in model["merges"]]


def _metaspace_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
