"""A Llama/Qwen2-family checkpoint in memory, and loading one from a Hugging Face folder.

Weights are float32, contiguous and laid out [in, out] once at load so that every matmul of the
numpy backend is `x @ w` on ready arrays. The q/k/v projections are fused into one matrix and the
gate/up projections into another: fewer, larger matmuls per token.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class CheckpointError(ValueError):
    """A model file that cannot be loaded; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ModelArchitecture:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    tied_embeddings: bool
    max_positions: int

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"{self.num_heads} heads do not split into {self.num_kv_heads} kv groups")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim {self.head_dim} is odd: RoPE needs pairs")


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray  # [H]
    qkv: np.ndarray  # [H, (heads + 2 * kv_heads) * head_dim]: q, then k, then v columns
    qkv_bias: np.ndarray | None  # [(heads + 2 * kv_heads) * head_dim]
    o: np.ndarray  # [heads * head_dim, H]
    o_bias: np.ndarray | None  # [H]
    mlp_norm: np.ndarray  # [H]
    gate_up: np.ndarray  # [H, 2 * I]: gate, then up columns
    down: np.ndarray  # [I, H]


@dataclass(frozen=True)
class Weights:
    arch: ModelArchitecture
    embed: np.ndarray  # [V, H]
    layers: tuple[LayerWeights, ...]
    final_norm: np.ndarray  # [H]
    lm_head: np.ndarray  # [H, V]; a transposed view of `embed` when the embeddings are tied


def load_hf_checkpoint(folder: str | Path) -> Weights:
    """A Hugging Face folder: `config.json` and one or more `*.safetensors` files."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    arch = architecture_from_hf_config(json.loads(config_path.read_text()), config_path)
    loaders: dict[str, Callable[[], np.ndarray]] = {}
    for file in files:
        loaders.update(safetensors_loaders(file))
    return weights_from_hf_tensors(arch, LazyTensors(loaders), folder)


def architecture_from_hf_config(config: dict, source: Path) -> ModelArchitecture:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (only silu)")
    if config.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias is not supported")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return ModelArchitecture(
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads,
        intermediate_size=config["intermediate_size"],
        rope_theta=_rope_theta(config, source),
        rms_eps=config.get("rms_norm_eps", 1e-6),
        vocab_size=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_positions=config.get("max_position_embeddings", 4096),
    )


def _rope_theta(config: dict, source: Path) -> float:
    """Older configs have top-level `rope_theta` (+ `rope_scaling`); newer ones `rope_parameters`."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or parameters
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: RoPE scaling {rope_type!r} is not supported (only default)")
    return float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))


def weights_from_hf_tensors(
    arch: ModelArchitecture, tensors: Mapping[str, np.ndarray], source: Path
) -> Weights:
    """Arrange tensors named as in Hugging Face's Llama/Qwen2 (weight [out, in]) for the numpy math."""
    named = _NamedTensors(tensors, source)
    shape = (arch.vocab_size, arch.hidden_size)
    embed = np.ascontiguousarray(named.take("model.embed_tokens.weight", shape))
    lm_head = embed.T if arch.tied_embeddings else _transposed(named.take("lm_head.weight", shape))
    return Weights(
        arch=arch,
        embed=embed,
        layers=tuple(_layer_weights(arch, i, named) for i in range(arch.num_layers)),
        final_norm=named.take("model.norm.weight", (arch.hidden_size,)).copy(),
        lm_head=lm_head,
    )


class LazyTensors(Mapping[str, np.ndarray]):
    """Tensors converted to float32 only when taken, so that a checkpoint is never in memory twice."""

    def __init__(self, loaders: Mapping[str, Callable[[], np.ndarray]]) -> None:
        self._loaders = loaders

    def __getitem__(self, name: str) -> np.ndarray:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


class _NamedTensors:
    def __init__(self, tensors: Mapping[str, np.ndarray], source: Path) -> None:
        self._tensors = tensors
        self._source = source

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._tensors:
            raise CheckpointError(f"{self._source}: tensor {name} is missing")
        tensor = self._tensors[name]
        if tensor.shape != shape:
            raise CheckpointError(f"{self._source}: tensor {name} has shape {tensor.shape}, expected {shape}")
        return tensor.astype(np.float32, copy=False)


def _layer_weights(arch: ModelArchitecture, index: int, named: _NamedTensors) -> LayerWeights:
    prefix = f"model.layers.{index}."
    hidden, inter = arch.hidden_size, arch.intermediate_size
    rows = {"q": arch.num_heads * arch.head_dim, "k": arch.num_kv_heads * arch.head_dim}
    rows["v"] = rows["k"]
    qkv = [named.take(f"{prefix}self_attn.{p}_proj.weight", (n, hidden)) for p, n in rows.items()]
    bias_names = {f"{prefix}self_attn.{p}_proj.bias": n for p, n in rows.items()}
    present = [name in named for name in bias_names]
    if any(present) and not all(present):
        raise CheckpointError(f"layer {index}: q/k/v biases must be all present or all absent")
    qkv_bias = np.concatenate([named.take(b, (n,)) for b, n in bias_names.items()]) if all(present) else None
    o_bias = f"{prefix}self_attn.o_proj.bias"
    gate = named.take(f"{prefix}mlp.gate_proj.weight", (inter, hidden))
    up = named.take(f"{prefix}mlp.up_proj.weight", (inter, hidden))
    return LayerWeights(
        attn_norm=named.take(f"{prefix}input_layernorm.weight", (hidden,)).copy(),
        qkv=_transposed(np.concatenate(qkv)),
        qkv_bias=qkv_bias,
        o=_transposed(named.take(f"{prefix}self_attn.o_proj.weight", (hidden, rows["q"]))),
        o_bias=named.take(o_bias, (hidden,)).copy() if o_bias in named else None,
        mlp_norm=named.take(f"{prefix}post_attention_layernorm.weight", (hidden,)).copy(),
        gate_up=_transposed(np.concatenate([gate, up])),
        down=_transposed(named.take(f"{prefix}mlp.down_proj.weight", (hidden, inter))),
    )


def _transposed(weight: np.ndarray) -> np.ndarray:
    """[out, in] -> contiguous float32 [in, out]."""
    return np.ascontiguousarray(weight.T, dtype=np.float32)


# --- safetensors ---------------------------------------------------------------------------------
# Read here rather than with the `safetensors` package because it cannot give numpy bfloat16
# tensors (numpy has no such dtype) and most published Qwen/Llama checkpoints are bfloat16.
# Format: 8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, data.

_PLAIN_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}
_MAX_HEADER_BYTES = 100 << 20


def safetensors_loaders(path: Path) -> dict[str, Callable[[], np.ndarray]]:
    """For each tensor of one file, a function reading it as float32 (from a memory map)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if raw.size < 8:
        raise CheckpointError(f"{path}: too short to be a safetensors file")
    (length,) = struct.unpack("<Q", raw[:8].tobytes())
    if length > min(_MAX_HEADER_BYTES, raw.size - 8):
        raise CheckpointError(f"{path}: corrupt safetensors header (length {length})")
    try:
        header = json.loads(raw[8 : 8 + length].tobytes())
    except ValueError as error:
        raise CheckpointError(f"{path}: safetensors header is not JSON: {error}") from None
    header.pop("__metadata__", None)

    def loader(name: str, entry: dict) -> Callable[[], np.ndarray]:
        begin, end = (8 + length + offset for offset in entry["data_offsets"])
        return lambda: _as_float32(path, name, entry["dtype"], raw[begin:end]).reshape(entry["shape"])

    return {name: loader(name, entry) for name, entry in header.items()}


def _as_float32(path: Path, name: str, dtype: str, data: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        # bfloat16 is the high half of a float32: widening the bits is exact.
        return (data.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype in _PLAIN_DTYPES:
        return data.view(_PLAIN_DTYPES[dtype]).astype(np.float32)
    raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; supported: F32, F16, BF16")
