"""Loading a Llama/Qwen2-family checkpoint from a GGUF file (llama.cpp's format), dequantized once.

Tensors are renamed to Hugging Face names and handed to the same builder as a Hugging Face folder.
llama.cpp's converter permutes the q/k rows of `llama`-architecture models (for its interleaved
RoPE); they are permuted back here to the half-split order our RoPE uses. `qwen2` files are not
permuted by the converter, so they are taken as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from worker.core.checkpoint import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    LazyTensors,
    ModelArchitecture,
    Weights,
    weights_from_hf_tensors,
)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def load_gguf_checkpoint(reader: gguf.GGUFReader, origin: Path) -> Weights:
    """The weights of an opened GGUF file (the tokenizer reads the same reader: open it once)."""
    architecture = _field(reader, "general.architecture", origin)
    if architecture not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{origin}: architecture {architecture!r} is not one of {SUPPORTED_MODEL_TYPES}"
        )
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    arch = _architecture(reader, architecture, tensors, origin)
    permuted_heads = {"q": arch.num_heads, "k": arch.num_kv_heads} if architecture == "llama" else {}
    loaders = {
        _hf_name(name, origin): _loader(tensor, permuted_heads.get(_projection(name)))
        for name, tensor in tensors.items()
    }
    return weights_from_hf_tensors(arch, LazyTensors(loaders), origin)


def _architecture(
    reader: gguf.GGUFReader, architecture: str, tensors: dict, origin: Path
) -> ModelArchitecture:
    def key(name: str, default: object = None) -> object:
        return _field(reader, f"{architecture}.{name}", origin, default)

    scaling = key("rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"{origin}: RoPE scaling {scaling!r} is not supported")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"{origin}: partial RoPE (rope.dimension_count < head size) is not supported")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])
    return ModelArchitecture(
        hidden_size=hidden,
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(key("feed_forward_length")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_eps=float(key("attention.layer_norm_rms_epsilon")),
        vocab_size=int(key("vocab_size", vocab_size)),
        tied_embeddings="output.weight" not in tensors,
        max_positions=int(key("context_length")),
    )


def _field(reader: gguf.GGUFReader, name: str, origin: Path, default: object = None) -> object:
    field = reader.get_field(name)
    if field is not None:
        return field.contents()
    if default is None:
        raise CheckpointError(f"{origin}: metadata key {name} is missing")
    return default


def _hf_name(name: str, origin: Path) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    stem, _, kind = name.rpartition(".")
    parts = stem.split(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return name  # unknown tensors (e.g. rope_freqs) are kept under their own name and left unused


def _projection(name: str) -> str | None:
    """'q' or 'k' for a query/key projection tensor (weight or bias), else None."""
    parts = name.split(".")
    return {"attn_q": "q", "attn_k": "k"}.get(parts[2]) if len(parts) == 4 else None


def _loader(tensor: gguf.ReaderTensor, permuted_heads: int | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        values = values.reshape(tuple(int(n) for n in reversed(tensor.shape)))
        return values if permuted_heads is None else unpermute_rows(values, permuted_heads)

    return load


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's `permute` of q/k rows (per head: interleaved -> half-split pairs).

    The converter reshapes each head's rows to (2, dim/2) and swaps the axes; swapping back
    restores the Hugging Face order. Works on weights [rows, in] and biases [rows].
    """
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )
