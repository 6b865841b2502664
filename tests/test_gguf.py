"""GGUF checkpoints: written by gguf.GGUFWriter as llama.cpp's converter would, they load to the same
model as the Hugging Face folder; and the embedded SmolLM2 GGUF answers a chat prompt."""

from __future__ import annotations

import threading
from dataclasses import replace

import gguf
import numpy as np
import pytest

from common.config import GenerationDefaults, ModelConfig
from tests.probe_graphs import driver_logits
from tests.tiny_models import random_tensors, reference_logits, tiny_config, write_gguf, write_hf_checkpoint
from worker.core.checkpoint import CheckpointError, load_hf_checkpoint
from worker.core.engine import load_engine
from worker.core.gguf_checkpoint import load_gguf_checkpoint
from worker.core.numpy_graphs import NumpyGraphs
from worker.core.request import USER, ChatRequest, FinishReason, SamplingParams, Turn

SEQUENCE = [7, 3, 41, 12, 9, 88, 23, 5, 61, 30, 2, 17]


def load_gguf(path):
    return load_gguf_checkpoint(gguf.GGUFReader(path), path)


@pytest.mark.parametrize(
    ("model_type", "bias", "tied"),
    [("llama", False, False), ("llama", False, True), ("qwen2", True, True)],
)
def test_gguf_gives_the_same_logits_as_the_hf_folder(tmp_path, model_type, bias, tied):
    config = tiny_config(model_type, heads=4, kv_heads=2, tied=tied)
    tensors = random_tensors(config, seed=11, bias=bias)
    hf = load_hf_checkpoint(write_hf_checkpoint(tmp_path / "hf", config, tensors))
    from_gguf = load_gguf(write_gguf(tmp_path / "model.gguf", config, tensors))
    assert replace(from_gguf.arch, rms_eps=hf.arch.rms_eps) == hf.arch
    assert from_gguf.arch.rms_eps == pytest.approx(hf.arch.rms_eps)  # stored as float32 in GGUF
    prompt, forced = SEQUENCE[:5], SEQUENCE[5:]

    gguf_logits = driver_logits(NumpyGraphs(from_gguf, seq_len=32), prompt, forced)
    hf_logits = driver_logits(NumpyGraphs(hf, seq_len=32), prompt, forced)

    np.testing.assert_allclose(gguf_logits, hf_logits, rtol=1e-6, atol=1e-6)
    expected = reference_logits(config, tensors, SEQUENCE)[len(prompt) - 1 : -1]
    np.testing.assert_allclose(gguf_logits, expected, rtol=1e-4, atol=1e-4)


def test_llama_q_k_rows_are_stored_permuted(tmp_path):
    """Guards the test above against a vacuous permutation: the file's q/k rows differ from HF's."""
    config = tiny_config("llama", heads=4, kv_heads=2)
    tensors = random_tensors(config, seed=12, bias=False)
    reader = gguf.GGUFReader(write_gguf(tmp_path / "model.gguf", config, tensors))
    stored = {tensor.name: np.asarray(tensor.data) for tensor in reader.tensors}
    for name, hf_name in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
        same = np.array_equal(
            stored[f"blk.0.{name}.weight"], tensors[f"model.layers.0.self_attn.{hf_name}.weight"]
        )
        assert same == (name == "attn_v")


def test_unsupported_gguf_architecture_is_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2'"):
        load_gguf(tmp_path / "gpt2.gguf")


@pytest.fixture(scope="module")
def smollm2_engine():
    return load_engine(ModelConfig(defaults=GenerationDefaults(temperature=0.0)), device_id=0)


def test_builtin_smollm2_answers_a_chat_prompt(smollm2_engine):
    request = ChatRequest(
        "", (Turn(USER, "What is the capital of France?"),), SamplingParams(max_new_tokens=12)
    )

    chunks = list(smollm2_engine.generate(request, threading.Event()))

    answer = "".join(chunk.text for chunk in chunks)
    assert "Paris" in answer
    assert chunks[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert smollm2_engine.context_size == 2048
