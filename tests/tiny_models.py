"""Tiny random Llama/Qwen2 checkpoints written by the tests, and an independent reference forward.

The reference is deliberately written another way than the product's numpy_layers: float64, one
attention head at a time, RoPE by `rotate_half` concatenation, -inf causal masking, no fused
weights, full sequence at once. Agreement between the two is evidence, not a tautology.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file


def tiny_config(
    model_type: str = "qwen2",
    *,
    vocab_size: int = 97,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 48,
    rope_theta: float = 10000.0,
    tied: bool = False,
    max_positions: int = 256,
) -> dict:
    """A Hugging Face config.json dict with the old top-level `rope_theta`."""
    return {
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }


def random_tensors(config: dict, seed: int, *, bias: bool) -> dict[str, np.ndarray]:
    """Hugging Face-named float32 tensors; scaled so activations stay O(1) through the layers."""
    rng = np.random.default_rng(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    dim = hidden // config["num_attention_heads"]
    q_rows, kv_rows = config["num_attention_heads"] * dim, config["num_key_value_heads"] * dim

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def norm(size: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((config["vocab_size"], hidden)).astype(np.float32)
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = norm(hidden)
        tensors[p + "post_attention_layernorm.weight"] = norm(hidden)
        for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            tensors[f"{p}self_attn.{name}_proj.weight"] = matrix(rows, hidden)
            if bias:
                tensors[f"{p}self_attn.{name}_proj.bias"] = (0.5 * rng.standard_normal(rows)).astype(
                    np.float32
                )
        tensors[p + "self_attn.o_proj.weight"] = matrix(hidden, q_rows)
        tensors[p + "mlp.gate_proj.weight"] = matrix(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = matrix(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = matrix(hidden, inter)
    tensors["model.norm.weight"] = norm(hidden)
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = matrix(config["vocab_size"], hidden)
    return tensors


def write_hf_checkpoint(folder: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows of llama-architecture models."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_gguf(path: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    """The checkpoint as llama.cpp's converter would write it (float32), permutation included for llama."""
    arch = config["model_type"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    for name, tensor in tensors.items():
        if arch == "llama" and ".q_proj." in name:
            tensor = llama_cpp_permute(tensor, heads)
        elif arch == "llama" and ".k_proj." in name:
            tensor = llama_cpp_permute(tensor, kv_heads)
        writer.add_tensor(gguf_name(name), tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    fixed["lm_head.weight"] = "output.weight"
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, index, rest = hf_name.split(".", 3)
    stem, _, kind = rest.rpartition(".")
    return f"blk.{index}.{GGUF_NAMES[stem]}.{kind}"


def reference_logits(config: dict, tensors: dict[str, np.ndarray], token_ids: list[int]) -> np.ndarray:
    """Logits [L, V] of a full causal forward over token_ids, in float64."""
    t = {name: value.astype(np.float64) for name, value in tensors.items()}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    dim = config["hidden_size"] // heads
    eps = config["rms_norm_eps"]
    theta = config["rope_theta"] if "rope_theta" in config else config["rope_parameters"]["rope_theta"]
    length = len(token_ids)

    inverse_frequencies = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    frequencies = np.outer(np.arange(length), inverse_frequencies)
    cos = np.cos(np.concatenate([frequencies, frequencies], axis=-1))[:, None, :]
    sin = np.sin(np.concatenate([frequencies, frequencies], axis=-1))[:, None, :]

    def rotate_half(x: np.ndarray) -> np.ndarray:
        return np.concatenate([-x[..., dim // 2 :], x[..., : dim // 2]], axis=-1)

    def norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * weight

    x = t["model.embed_tokens.weight"][token_ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, t[p + "input_layernorm.weight"])

        def projection(name: str, h: np.ndarray = h, p: str = p) -> np.ndarray:
            y = h @ t[f"{p}self_attn.{name}_proj.weight"].T
            return y + t[f"{p}self_attn.{name}_proj.bias"] if f"{p}self_attn.{name}_proj.bias" in t else y

        q = projection("q").reshape(length, heads, dim)
        k = projection("k").reshape(length, kv_heads, dim)
        v = projection("v").reshape(length, kv_heads, dim)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        attention = np.zeros((length, heads, dim))
        for head in range(heads):
            group = head // (heads // kv_heads)
            scores = q[:, head] @ k[:, group].T / math.sqrt(dim)
            scores[np.triu_indices(length, 1)] = -np.inf
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
            attention[:, head] = (weights / weights.sum(axis=-1, keepdims=True)) @ v[:, group]
        x = x + attention.reshape(length, heads * dim) @ t[p + "self_attn.o_proj.weight"].T
        h = norm(x, t[p + "post_attention_layernorm.weight"])
        gate, up = h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T
    head_weight = t["model.embed_tokens.weight"] if config["tie_word_embeddings"] else t["lm_head.weight"]
    return norm(x, t["model.norm.weight"]) @ head_weight.T
