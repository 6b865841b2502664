"""The stand-in's "bmodel": a JSON file naming a Hugging Face checkpoint and how its graphs were compiled.

A real bmodel holds the graphs that sophon-demo's `tools/export_onnx_qwen*.py` trace, compiled by
tpu-mlir (`scripts/gen_bmodel.sh`). This describes the same graphs for a tiny checkpoint (names,
input/output shapes and dtypes, static or dynamic, addr mode, what lm_head returns) and computes
each one with the numpy layer math of worker/core/numpy_layers.py, in float32 on the host; the
sail stand-in stores every input and output in device memory in the graph's dtype, as the chip does.

Shapes follow the export scripts and gen_bmodel.sh for one device (S = seq_len, H = hidden size):
  embedding           input_ids [1, S] int32                 -> hidden [1, S, H]
  embedding_cache     input_ids [1, 1] int32                 -> hidden [1, 1, H]
  block_{i}           hidden [1, S, H], position_ids [1, S] int32, mask [1, 1, S, S]
                                                             -> hidden, k [1, S, kv, d], v
  block_cache_{i}     hidden [1, 1, H], position_ids [1, 1] int32, mask [1, 1, 1, S + 1],
                      history_k [1, S, kv, d], history_v     -> hidden, k [1, 1, kv, d], v
  lm_head             hidden [1, H] -> logits [1, V] float32 (gen_bmodel.sh, --quant_input only)
                      or hidden [1, 1, H] -> token [1, 1] int32 (lm_head_with_topk)
  greedy_head, penalty_sample_head: listed with their shapes; the stand-in does not compute them.
  block_kv_{i}        with history_kv (LLM-TPU --use_history_kv): sophon/_history.py
Activations, k/v and masks use the compiled dtype (`--quant_input --quant_output`: F16 or BF16).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.core.checkpoint import Weights, load_hf_checkpoint
from worker.core.numpy_layers import attend, embed, finish_layer, head_logits, project_qkv

FORMAT = "sail-standin-bmodel/1"
IO_DTYPES = ("float16", "bfloat16")
LM_HEADS = ("logits", "token_id")
PENALTY_TOP_K = 50  # candidates penalty_sample_head returns (PenaltySampleHead's top_k in the export)

Compute = Callable[[list[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class TensorDef:
    name: str
    shape: tuple[int, ...]  # the max shape; a dynamic graph accepts any shape up to it
    dtype: str  # float32 | float16 | bfloat16 | int32


@dataclass(frozen=True)
class GraphDef:
    inputs: tuple[TensorDef, ...]
    outputs: tuple[TensorDef, ...]
    is_dynamic: bool
    compute: Compute | None  # host float32/int32 arrays in, out; None: listed but not computed


@dataclass(frozen=True)
class Bmodel:
    addr_mode: int
    graphs: dict[str, GraphDef]  # in the order model_tool --combine puts them


def write_bmodel(
    path: Path,
    checkpoint: Path,
    *,
    seq_len: int,
    dynamic: bool = False,
    addr_mode: int = 0,
    io_dtype: str = "float16",
    lm_head: str = "logits",
    sampling_heads: bool = False,
    history_kv: bool = False,
    prefill_kv_length: int | None = None,
) -> Path:
    """Write a stand-in bmodel file describing `checkpoint` compiled with these options."""
    if io_dtype not in IO_DTYPES or lm_head not in LM_HEADS or addr_mode not in (0, 1):
        raise ValueError(f"io_dtype {io_dtype!r}, lm_head {lm_head!r}, addr_mode {addr_mode!r}")
    if history_kv and not dynamic:
        raise ValueError("history_kv needs dynamic graphs (LLM-TPU's --use_history_kv forces --dynamic)")
    description = {
        "format": FORMAT,
        "checkpoint": str(Path(checkpoint).resolve()),
        "seq_len": seq_len,
        "dynamic": dynamic,
        "addr_mode": addr_mode,
        "io_dtype": io_dtype,
        "lm_head": lm_head,
        "sampling_heads": sampling_heads,
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
    return Bmodel(addr_mode=description["addr_mode"], graphs=_graphs(weights, description))


def _graphs(weights: Weights, description: dict) -> dict[str, GraphDef]:
    arch, seq, act = weights.arch, description["seq_len"], description["io_dtype"]
    hidden, kv = arch.hidden_size, (arch.num_kv_heads, arch.head_dim)
    dynamic = description["dynamic"]
    graphs = {
        "embedding": GraphDef(
            (TensorDef("input_ids", (1, seq), "int32"),),
            (TensorDef("hidden_states", (1, seq, hidden), act),),
            dynamic,
            lambda io: [embed(weights, io[0][0])[None]],
        ),
        "embedding_cache": GraphDef(
            (TensorDef("input_ids", (1, 1), "int32"),),
            (TensorDef("hidden_states", (1, 1, hidden), act),),
            False,
            lambda io: [embed(weights, io[0][0])[None]],
        ),
        "lm_head": _lm_head(weights, act, description["lm_head"]),
    }
    if description["sampling_heads"]:
        graphs.update(_sampling_heads(arch.vocab_size, seq))
    if description.get("history_kv"):
        from sophon._history import history_graphs

        graphs.update(history_graphs(weights, seq, description["prefill_kv_length"], act))
    for layer in range(arch.num_layers):
        graphs[f"block_{layer}"] = GraphDef(
            (
                TensorDef("input_states", (1, seq, hidden), act),
                TensorDef("position_ids", (1, seq), "int32"),
                TensorDef("attention_mask", (1, 1, seq, seq), act),
            ),
            _layer_outputs(seq, hidden, kv, act),
            dynamic,
            _block(weights, layer),
        )
        graphs[f"block_cache_{layer}"] = GraphDef(
            (
                TensorDef("input_states", (1, 1, hidden), act),
                TensorDef("position_ids", (1, 1), "int32"),
                TensorDef("attention_mask", (1, 1, 1, seq + 1), act),
                TensorDef("history_k", (1, seq, *kv), act),
                TensorDef("history_v", (1, seq, *kv), act),
            ),
            _layer_outputs(1, hidden, kv, act),
            False,
            _block_cache(weights, layer),
        )
    return graphs


def _layer_outputs(length: int, hidden: int, kv: tuple[int, int], act: str) -> tuple[TensorDef, ...]:
    return (
        TensorDef("hidden_states", (1, length, hidden), act),
        TensorDef("past_k", (1, length, *kv), act),
        TensorDef("past_v", (1, length, *kv), act),
    )


def _block(weights: Weights, layer: int) -> Compute:
    def compute(io: list[np.ndarray]) -> list[np.ndarray]:
        hidden, positions, mask = io
        out, k, v = decoder_layer(weights, layer, hidden[0], positions[0], mask[0, 0])
        return [out[None], k[None], v[None]]

    return compute


def _block_cache(weights: Weights, layer: int) -> Compute:
    def compute(io: list[np.ndarray]) -> list[np.ndarray]:
        hidden, positions, mask, past_k, past_v = io
        out, k, v = decoder_layer(weights, layer, hidden[0], positions[0], mask[0, 0], past_k[0], past_v[0])
        return [out[None], k[None], v[None]]

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

    def logits(io: list[np.ndarray]) -> list[np.ndarray]:
        return [head_logits(weights, io[0].reshape(hidden))[None]]

    def token(io: list[np.ndarray]) -> list[np.ndarray]:
        return [np.array([[np.argmax(logits(io)[0])]], dtype=np.int32)]

    if kind == "logits":
        return GraphDef(
            (TensorDef("hidden_states", (1, hidden), act),),
            (TensorDef("m_logits", (1, vocab), "float32"),),
            False,
            logits,
        )
    return GraphDef(
        (TensorDef("hidden_states", (1, 1, hidden), act),),
        (TensorDef("token", (1, 1), "int32"),),
        False,
        token,
    )


def _sampling_heads(vocab: int, seq: int) -> dict[str, GraphDef]:
    logits = TensorDef("m_logits", (1, vocab), "float32")
    scalars = (TensorDef(name, (1,), "float32") for name in ("top_p", "temperature", "penalty"))
    return {
        "greedy_head": GraphDef((logits,), (TensorDef("token", (1, 1), "int32"),), False, None),
        "penalty_sample_head": GraphDef(
            (logits, TensorDef("input_ids", (1, seq), "int32"), *scalars),
            (
                TensorDef("probs", (1, PENALTY_TOP_K), "float32"),
                TensorDef("token", (1, PENALTY_TOP_K), "int32"),
            ),
            False,
            None,
        ),
    }
