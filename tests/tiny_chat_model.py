"""A tiny chat model folder for pool tests: byte-level BPE tokenizer, ChatML template, random Qwen2.

Loads in a fraction of a second, so a pool of real numpy workers starts fast. The tokenizer is
trained with the `tokenizers` library on a few lines of English and Chinese; the weights are
random (tests/tiny_models.py). The lm_head rows of the special tokens are zero, so their logits
are always 0 while the largest of the other logits is positive: the hundreds of random rows
positively span the small hidden space, so any nonzero hidden state has a positive dot product
with one of them. Greedy decoding therefore never picks an end-of-sequence token, and a greedy
answer always runs to max_new_tokens: as long as a test needs, and never cut short by chance.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.tiny_models import random_tensors, tiny_config, write_hf_checkpoint

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 420  # 256 bytes, the special tokens, and merges learned from CORPUS
MAX_POSITIONS = 8192
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "You are a helpful assistant.",
    "Hello! How can I help you today? Tell me a story about a cat and a dog.",
    "The quick brown fox jumps over the lazy dog. Once upon a time there was a little robot.",
    "你好！我是一个乐于助人的助手。今天天气很好，我们去公园散步吧。",
    "请介绍一下你自己。我喜欢读书、写字和学习新的东西。",
] * 4


def write_tiny_chat_model(folder: Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}), encoding="utf-8"
    )
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), max_positions=MAX_POSITIONS)
    tensors = random_tensors(config, seed, bias=True)
    for token in SPECIAL_TOKENS:
        tensors["lm_head.weight"][tokenizer.token_to_id(token)] = 0.0
    return write_hf_checkpoint(folder, config, tensors)


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer
