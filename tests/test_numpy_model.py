"""The numpy backend's numerics: a real trained model reproduces an independent implementation's
greedy output exactly, and tiny random checkpoints match an independent full-sequence forward."""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.probe_graphs import driver_logits
from tests.tiny_models import random_tensors, reference_logits, tiny_config, write_hf_checkpoint
from worker.core.checkpoint import CheckpointError, load_hf_checkpoint, safetensors_loaders
from worker.core.driver import Generation
from worker.core.numpy_graphs import NumpyGraphs
from worker.core.request import USER, FinishReason, Turn


def greedy(logits: np.ndarray, tokens: list[int]) -> int:
    return int(np.argmax(logits))


def test_stories260k_greedy_256_tokens_match_llama2c(fixtures_dir, stories_tokenizer):
    folder = fixtures_dir / "stories260K"
    expected_text = (folder / "greedy_256_from_bos.txt").read_text(encoding="utf-8").removesuffix("\n")
    expected_ids = stories_tokenizer.encode(expected_text)
    assert len(expected_ids) == 256  # the file is the decode of exactly the 256 generated tokens

    graphs = NumpyGraphs(load_hf_checkpoint(folder / "hf"), seq_len=512)
    generation = Generation(graphs, [1], greedy, 256, eos_ids=(), cancel=threading.Event())
    ids = list(generation)

    assert ids == expected_ids
    assert stories_tokenizer.decode(ids) == expected_text
    assert generation.finish_reason is FinishReason.LENGTH


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> tuple[dict, dict, Path]:
    """Qwen2 with q/k/v biases and GQA (4 heads over 2 kv heads), separate lm_head."""
    config = tiny_config("qwen2", layers=3, heads=4, kv_heads=2)
    tensors = random_tensors(config, seed=1, bias=True)
    return config, tensors, write_hf_checkpoint(tmp_path_factory.mktemp("qwen2"), config, tensors)


def test_driver_logits_match_reference_forward(tiny_qwen2):
    config, tensors, folder = tiny_qwen2
    sequence = [int(i) for i in np.random.default_rng(5).integers(0, config["vocab_size"], 20)]
    prompt, forced = sequence[:7], sequence[7:]
    expected = reference_logits(config, tensors, sequence)[len(prompt) - 1 : -1]

    logits = driver_logits(NumpyGraphs(load_hf_checkpoint(folder), seq_len=64), prompt, forced)

    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert np.ptp(expected) > 1.0  # the comparison is not between near-constant vectors


def test_prefill_and_step_by_step_decode_agree(tiny_qwen2):
    _, _, folder = tiny_qwen2
    weights = load_hf_checkpoint(folder)
    sequence = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]

    all_at_once = driver_logits(NumpyGraphs(weights, seq_len=32), sequence, [0])[-1]
    one_by_one = driver_logits(NumpyGraphs(weights, seq_len=32), sequence[:1], [*sequence[1:], 0])[-1]

    np.testing.assert_allclose(one_by_one, all_at_once, rtol=1e-5, atol=1e-5)


def test_static_seq_len_and_dynamic_modes_agree(tiny_qwen2):
    _, _, folder = tiny_qwen2
    weights = load_hf_checkpoint(folder)
    prompt, forced = [5, 8, 13, 21, 34], [55, 89 % 97, 44, 33, 22, 11]

    dynamic = driver_logits(NumpyGraphs(weights, seq_len=24, is_dynamic=True), prompt, forced)
    static = driver_logits(NumpyGraphs(weights, seq_len=24, is_dynamic=False), prompt, forced)

    np.testing.assert_allclose(static, dynamic, rtol=1e-5, atol=1e-5)


def test_real_qwen25_vocabulary_and_chat_prompt(tmp_path, fixtures_dir, qwen25_tokenizer):
    vocab_size = json.loads((fixtures_dir / "qwen2.5-tokenizer" / "config.json").read_text())["vocab_size"]
    config = tiny_config(
        "qwen2", vocab_size=vocab_size, hidden_size=16, layers=1, heads=2, kv_heads=1, rope_theta=1e6
    )
    tensors = random_tensors(config, seed=2, bias=True)
    folder = write_hf_checkpoint(tmp_path / "qwen25-vocab", config, tensors)
    text = qwen25_tokenizer.chat_template.render("你是一个助手。", (Turn(USER, "你好，世界"),))
    prompt = qwen25_tokenizer.encode_prompt(text)
    assert max(prompt) >= 151644  # <|im_start|>: ids beyond the base vocabulary are exercised
    forced = [151643, 108386, 3837]

    logits = driver_logits(NumpyGraphs(load_hf_checkpoint(folder), seq_len=64), prompt, forced)

    expected = reference_logits(config, tensors, prompt + forced)[len(prompt) - 1 : -1]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_newer_rope_parameters_config_key(tmp_path):
    config = tiny_config("llama", rope_theta=500.0, tied=True)
    tensors = random_tensors(config, seed=3, bias=False)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    weights = load_hf_checkpoint(write_hf_checkpoint(tmp_path, config, tensors))
    assert weights.arch.rope_theta == 500.0
    sequence = [1, 2, 3, 4, 5, 6, 7, 8, 9]

    logits = driver_logits(NumpyGraphs(weights, seq_len=16), sequence[:4], sequence[4:])

    np.testing.assert_allclose(
        logits, reference_logits(config, tensors, sequence)[3:-1], rtol=1e-4, atol=1e-4
    )


def test_everything_stays_float32(tiny_qwen2):
    _, _, folder = tiny_qwen2
    weights = load_hf_checkpoint(folder)
    arrays = [weights.embed, weights.final_norm, weights.lm_head]
    for layer in weights.layers:
        arrays += [
            layer.attn_norm,
            layer.qkv,
            layer.qkv_bias,
            layer.o,
            layer.mlp_norm,
            layer.gate_up,
            layer.down,
        ]
    assert {array.dtype for array in arrays} == {np.dtype(np.float32)}

    graphs = NumpyGraphs(weights, seq_len=16)
    hidden = graphs.embedding(np.array([[1, 2, 3]], dtype=np.int32))
    mask = np.triu(np.full((3, 3), -10000.0, dtype=np.float32), 1)[None, None]
    hidden = graphs.block(0, hidden, np.array([[0, 1, 2]], dtype=np.int32), mask)
    decode_mask = np.zeros((1, 1, 1, 17), dtype=np.float32)
    decode_mask[..., 3:16] = -10000.0
    step = graphs.block_cache(0, graphs.embedding_cache(4), 3, decode_mask)
    outputs = [hidden, step, graphs.lm_head(hidden, 2), graphs.k_cache, graphs.v_cache]
    assert [array.dtype for array in outputs] == [np.dtype(np.float32)] * 5


def test_half_precision_safetensors_are_widened_exactly(tmp_path):
    values = np.random.default_rng(0).standard_normal(12).astype(np.float32)
    bf16_bits = (values.view(np.uint32) >> 16).astype("<u2")
    payload = bf16_bits.tobytes()
    header = json.dumps({"x": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, len(payload)]}}).encode()
    (tmp_path / "bf16.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + payload)
    write_hf_checkpoint(tmp_path / "f16", {}, {"y": values.astype(np.float16)})

    bf16 = safetensors_loaders(tmp_path / "bf16.safetensors")["x"]()
    f16 = safetensors_loaders(tmp_path / "f16" / "model.safetensors")["y"]()

    np.testing.assert_array_equal(bf16, (bf16_bits.astype(np.uint32) << 16).view(np.float32).reshape(3, 4))
    np.testing.assert_array_equal(f16, values.astype(np.float16).astype(np.float32))
    assert bf16.dtype == f16.dtype == np.float32


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    config = tiny_config("qwen2")
    tensors = random_tensors(config, seed=4, bias=True)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        load_hf_checkpoint(write_hf_checkpoint(tmp_path / "missing", config, tensors))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        load_hf_checkpoint(write_hf_checkpoint(tmp_path / "gpt2", {**config, "model_type": "gpt2"}, tensors))
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_hf_checkpoint(tmp_path)
