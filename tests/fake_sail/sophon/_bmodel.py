"""The stand-in's "bmodel": a JSON file naming a Hugging Face checkpoint and how its graphs were compiled.

A real bmodel holds the graphs that sophon-demo's `tools/export_onnx_qwen*.py` trace, compiled by
tpu-mlir (`scripts/gen_bmodel.sh`). This describes the same graphs for a tiny checkpoint (names,
input/output shapes and dtypes, static or dynamic, addr mode, devices, what lm_head returns) and
computes each one with the numpy layer math of worker/core/numpy_layers.py, in float32 on the host;
the sail stand-in stores every input and output in device memory in the graph's dtype, as the chip does.

Shapes follow the export scripts and gen_bmodel.sh (S = seq_len, P = max_input_length, the prefill
length, S unless set: LLM-TPU's exports compile them apart; H = hidden size):
  embedding           input_ids [1, P] int32                 -> hidden [1, P, H] BF16
  embedding_cache     input_ids [1, 1] int32                 -> hidden [1, 1, H] BF16
  block_{i}           hidden [1, P, H], position_ids [1, P] int32, mask [1, 1, P, P]
                                                             -> hidden, k [1, P, kv, d], v
  block_cache_{i}     hidden [1, 1, H], position_ids [1, 1] int32, mask [1, 1, 1, S + 1],
                      history_k [1, S, kv, d], history_v     -> hidden, k [1, 1, kv, d], v
  lm_head             hidden [1, H] -> logits [1, V] float32 (gen_bmodel.sh, --quant_input only)
                      or hidden [1, 1, H] -> token [1, 1] int32 (lm_head_with_topk)
  greedy_head         logits [1, V] -> token [1, 1] int32 (export_onnx_qwen2.py GreedyHead)
  penalty_sample_head listed with its shapes, not computed.
gen_bmodel.sh compiles the embeddings with `--quantize BF16` whatever the mode, so beside F16
blocks (mode f16) the embedding's output is BF16; blocks and block_caches use the mode's activation
dtype; `--dynamic` applies to embedding, block and block_cache, `--addr_mode io_alone` to block_cache
only. A model compiled for N devices (`--num_device N`, sophon-demo's `2dev` bmodels, laid out as
sophon-demo's python/qwen.py drives them) repeats every input and output of the embeddings and
blocks once per device, device j's at indexes [j * n, (j + 1) * n): hidden states, positions and
masks are replicated, k/v split over the kv heads; lm_head and the sampling heads sit on device 0.
  block_kv_{i}        with history_kv (LLM-TPU --use_history_kv): sophon/_history.py
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.core.checkpoint import Weights, load_hf_checkpoint
from worker.core.numpy_layers import attend, embed, finish_layer, head_logits, project_qkv

FORMAT = "sail-standin-bmodel/2"
IO_DTYPES = ("float16", "bfloat16")
# What lm_head returns: logits [1, V]; a token id [1, 1] (lm_head_with_topk), [1] (an argmax over
# the last axis of [1, V]), or the top-k ids [1, K] best first (torch.topk sorts).
LM_HEADS = ("logits", "token_id", "token_id_1d", "top_k")
TOP_K = 5
PENALTY_TOP_K = 50  # candidates penalty_sample_head returns (PenaltySampleHead's top_k in the export)

Compute = Callable[[list[np.ndarray]], list[np.ndarray]]


class DeviceInputsDiffer(ValueError):
    """A replicated input holds different values on two devices: the chips would disagree."""


@dataclass(frozen=True)
class TensorDef:
    name: str
    shape: tuple[int, ...]  # the max shape; a dynamic graph accepts any shape up to it
    dtype: str  # float32 | float16 | bfloat16 | int32
    device: int = 0  # index into the engine's dev_ids


@dataclass(frozen=True)
class GraphDef:
    inputs: tuple[TensorDef, ...]
    outputs: tuple[TensorDef, ...]
    is_dynamic: bool
    addr_mode: int  # 1 = io_alone: the runtime allocates the graph's IO memory
    compute: Compute | None  # host float32/int32 arrays in, out; None: listed but not computed


@dataclass(frozen=True)
class Bmodel:
    num_device: int
    graphs: dict[str, GraphDef]  # in the order model_tool --combine puts them


def write_bmodel(
    path: Path,
    checkpoint: Path,
    *,
    seq_len: int,
    max_input_length: int | None = None,
    dynamic: bool = False,
    block_cache_dynamic: bool | None = None,
    addr_mode: int = 0,
    io_dtype: str = "float16",
    embedding_dtype: str = "bfloat16",
    lm_head: str = "logits",
    lm_head_input_dtype: str | None = None,
    sampling_heads: bool = False,
    num_device: int = 1,
    history_kv: bool = False,
    prefill_kv_length: int | None = None,
) -> Path:
    """Write a stand-in bmodel file describing `checkpoint` compiled with these options
    (block_cache_dynamic None: as `dynamic`, which gen_bmodel.sh passes to block_cache too;
    lm_head_input_dtype None: the activations' dtype)."""
    if io_dtype not in IO_DTYPES or embedding_dtype not in IO_DTYPES or lm_head not in LM_HEADS:
        raise ValueError(f"io_dtype {io_dtype!r}, embedding_dtype {embedding_dtype!r}, lm_head {lm_head!r}")
    if addr_mode not in (0, 1) or num_device < 1:
        raise ValueError(f"addr_mode {addr_mode!r}, num_device {num_device!r}")
    if history_kv and not dynamic:
        raise ValueError("history_kv needs dynamic graphs (LLM-TPU's --use_history_kv forces --dynamic)")
    description = {
        "format": FORMAT,
        "checkpoint": str(Path(checkpoint).resolve()),
        "seq_len": seq_len,
        "max_input_length": max_input_length or seq_len,
        "dynamic": dynamic,
        "block_cache_dynamic": dynamic if block_cache_dynamic is None else block_cache_dynamic,
        "addr_mode": addr_mode,
        "io_dtype": io_dtype,
        "embedding_dtype": embedding_dtype,
        "lm_head": lm_head,
        "lm_head_input_dtype": lm_head_input_dtype or io_dtype,
        "sampling_heads": sampling_heads,
        "num_device": num_device,
        "history_kv": history_kv,
        "prefill_kv_length": prefill_kv_length or seq_len,
    }
    path.write_text(json.dumps(description, indent=2))
    return path


def load_bmodel(path: Path) -> Bmodel:
    try:
        description = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not a stand-in bmodel (a real bmodel needs the chip): {error}") from None
    if description.get("format") != FORMAT:
        raise ValueError(f"{path}: format {description.get('format')!r}, expected {FORMAT!r}")
    weights = load_hf_checkpoint(Path(description["checkpoint"]))
    return Bmodel(description["num_device"], _graphs(weights, description))


def _graphs(weights: Weights, description: dict) -> dict[str, GraphDef]:
    arch, seq, act = weights.arch, description["seq_len"], description["io_dtype"]
    prefill, emb = description["max_input_length"], description["embedding_dtype"]
    hidden, devices = arch.hidden_size, description["num_device"]
    if arch.num_kv_heads % devices:
        raise ValueError(f"{arch.num_kv_heads} kv heads cannot be split over {devices} devices")
    kv = (arch.num_kv_heads // devices, arch.head_dim)
    dynamic, cache_dynamic = description["dynamic"], description["block_cache_dynamic"]
    cache_addr_mode = description["addr_mode"]

    embedding = _replicated(devices, 1, lambda io: [embed(weights, io[0][0])[None]])

    graphs = {
        "embedding": GraphDef(
            _per_device(devices, TensorDef("input_ids", (1, prefill), "int32")),
            _per_device(devices, TensorDef("hidden_states", (1, prefill, hidden), emb)),
            dynamic,
            0,
            embedding,
        ),
        "embedding_cache": GraphDef(
            _per_device(devices, TensorDef("input_ids", (1, 1), "int32")),
            _per_device(devices, TensorDef("hidden_states", (1, 1, hidden), emb)),
            False,
            0,
            embedding,
        ),
        "lm_head": _lm_head(weights, description["lm_head_input_dtype"], description["lm_head"]),
    }
    if description["sampling_heads"]:
        graphs.update(_sampling_heads(arch.vocab_size, seq))
    if description.get("history_kv"):
        from sophon._history import history_graphs

        graphs.update(history_graphs(weights, prefill, description["prefill_kv_length"], act))
    for layer in range(arch.num_layers):
        graphs[f"block_{layer}"] = GraphDef(
            _per_device(
                devices,
                TensorDef("input_states", (1, prefill, hidden), act),
                TensorDef("position_ids", (1, prefill), "int32"),
                TensorDef("attention_mask", (1, 1, prefill, prefill), act),
            ),
            _per_device(devices, *_layer_outputs(prefill, hidden, kv, act)),
            dynamic,
            0,
            _block(weights, layer, devices),
        )
        graphs[f"block_cache_{layer}"] = GraphDef(
            _per_device(
                devices,
                TensorDef("input_states", (1, 1, hidden), act),
                TensorDef("position_ids", (1, 1), "int32"),
                TensorDef("attention_mask", (1, 1, 1, seq + 1), act),
                TensorDef("history_k", (1, seq, *kv), act),
                TensorDef("history_v", (1, seq, *kv), act),
            ),
            _per_device(devices, *_layer_outputs(1, hidden, kv, act)),
            cache_dynamic,
            cache_addr_mode,
            _block_cache(weights, layer, devices),
        )
    return graphs


def _per_device(devices: int, *specs: TensorDef) -> tuple[TensorDef, ...]:
    return tuple(
        TensorDef(spec.name, spec.shape, spec.dtype, device) for device in range(devices) for spec in specs
    )


def _layer_outputs(length: int, hidden: int, kv: tuple[int, int], act: str) -> tuple[TensorDef, ...]:
    return (
        TensorDef("hidden_states", (1, length, hidden), act),
        TensorDef("past_k", (1, length, *kv), act),
        TensorDef("past_v", (1, length, *kv), act),
    )


def _same_on_every_device(io: list[np.ndarray], per_device: int, replicated: range) -> list[np.ndarray]:
    """Device 0's inputs, after checking that each replicated one is equal on every device."""
    first = io[:per_device]
    for device in range(1, len(io) // per_device):
        for index in replicated:
            other = io[device * per_device + index]
            if other.shape != first[index].shape or not np.array_equal(other, first[index], equal_nan=True):
                raise DeviceInputsDiffer(f"input {index} on device {device} differs from device 0's")
    return first


def _replicated(devices: int, per_device: int, compute: Compute) -> Compute:
    """A graph whose every input is replicated and whose outputs are too (the embeddings)."""

    def run(io: list[np.ndarray]) -> list[np.ndarray]:
        return compute(_same_on_every_device(io, per_device, range(per_device))) * devices

    return run


def _shards(array: np.ndarray, devices: int) -> list[np.ndarray]:
    return np.split(array, devices, axis=2)  # [1, length, kv_heads, dim] over the kv heads


def _block(weights: Weights, layer: int, devices: int) -> Compute:
    def compute(io: list[np.ndarray]) -> list[np.ndarray]:
        hidden, positions, mask = _same_on_every_device(io, 3, range(3))
        out, k, v = decoder_layer(weights, layer, hidden[0], positions[0], mask[0, 0])
        k_shards, v_shards = _shards(k[None], devices), _shards(v[None], devices)
        return [x for d in range(devices) for x in (out[None], k_shards[d], v_shards[d])]

    return compute


def _block_cache(weights: Weights, layer: int, devices: int) -> Compute:
    def compute(io: list[np.ndarray]) -> list[np.ndarray]:
        hidden, positions, mask, _, _ = _same_on_every_device(io, 5, range(3))
        past_k = np.concatenate([io[5 * d + 3] for d in range(devices)], axis=2)
        past_v = np.concatenate([io[5 * d + 4] for d in range(devices)], axis=2)
        out, k, v = decoder_layer(weights, layer, hidden[0], positions[0], mask[0, 0], past_k[0], past_v[0])
        k_shards, v_shards = _shards(k[None], devices), _shards(v[None], devices)
        return [x for d in range(devices) for x in (out[None], k_shards[d], v_shards[d])]

    return compute


def decoder_layer(
    weights: Weights,
    index: int,
    hidden: np.ndarray,
    positions: np.ndarray,
    mask: np.ndarray,
    past_k: np.ndarray | None = None,
    past_v: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer as the bmodel graphs define it: `block_{i}` (no past) or `block_cache_{i}`.

    hidden [L, H] at `positions` [L]; past_k/past_v [P, kv_heads, dim] come before the new
    positions and mask [L, P + L] covers past then new keys. Returns (hidden [L, H], k, v) with
    k/v [L, kv_heads, dim] of the new positions only (the caller stores them).
    """
    layer, arch = weights.layers[index], weights.arch
    q, k, v = project_qkv(layer, arch, hidden, positions)
    keys = k if past_k is None else np.concatenate([past_k, k])
    values = v if past_v is None else np.concatenate([past_v, v])
    return finish_layer(layer, arch, hidden, attend(q, keys, values, mask)), k, v


def _lm_head(weights: Weights, act: str, kind: str) -> GraphDef:
    hidden, vocab = weights.arch.hidden_size, weights.arch.vocab_size

    def logits(io: list[np.ndarray]) -> np.ndarray:
        return head_logits(weights, io[0].reshape(hidden))

    if kind == "logits":
        return GraphDef(
            (TensorDef("hidden_states", (1, hidden), act),),
            (TensorDef("m_logits", (1, vocab), "float32"),),
            False,
            0,
            lambda io: [logits(io)[None]],
        )
    shapes = {"token_id": (1, 1), "token_id_1d": (1,), "top_k": (1, TOP_K)}
    count = math.prod(shapes[kind])

    def tokens(io: list[np.ndarray]) -> list[np.ndarray]:
        best = np.argsort(logits(io))[::-1][:count]
        return [best.astype(np.int32).reshape(shapes[kind])]

    return GraphDef(
        (TensorDef("hidden_states", (1, 1, hidden), act),),
        (TensorDef("token", shapes[kind], "int32"),),
        False,
        0,
        tokens,
    )


def _sampling_heads(vocab: int, seq: int) -> dict[str, GraphDef]:
    logits = TensorDef("m_logits", (1, vocab), "float32")
    scalars = (TensorDef(name, (1,), "float32") for name in ("top_p", "temperature", "penalty"))
    return {
        "greedy_head": GraphDef(
            (logits,),
            (TensorDef("token", (1, 1), "int32"),),
            False,
            0,
            lambda io: [np.array([[np.argmax(io[0][0])]], dtype=np.int32)],
        ),
        "penalty_sample_head": GraphDef(
            (logits, TensorDef("input_ids", (1, seq), "int32"), *scalars),
            (
                TensorDef("probs", (1, PENALTY_TOP_K), "float32"),
                TensorDef("token", (1, PENALTY_TOP_K), "int32"),
            ),
            False,
            0,
            None,
        ),
    }
