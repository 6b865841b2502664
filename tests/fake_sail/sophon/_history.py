"""The stand-in's prefill-with-history graphs: LLM-TPU's `block_kv_{i}` (`--use_history_kv`).

As LLM-TPU's export documents them (docs/LLM_Convert_Pipeline.md, "Net I/O layouts") and its demos
launch them (models/Qwen3/python_demo/chat.cpp, forward_first_with_kv and net_launch_kv_dyn): a
dynamic graph (the flag forces `--dynamic`) whose inputs are input_states [1, L, H], position_ids
[1, L], history_k and history_v [1, PREFILL_KV_LENGTH, kv_heads, dim], launched with the history
inputs at the cached length; the mask (every cached position, then causal over the chunk) is
compiled in. Outputs: hidden [1, L, H] and the chunk's k/v [1, L, kv_heads, dim].
"""

from __future__ import annotations

import numpy as np

from sophon._bmodel import Compute, GraphDef, TensorDef, decoder_layer
from worker.core.checkpoint import Weights
from worker.core.graphs import MASK_VALUE


def history_graphs(
    weights: Weights, max_input_length: int, prefill_kv_length: int, act: str
) -> dict[str, GraphDef]:
    hidden, kv = weights.arch.hidden_size, (weights.arch.num_kv_heads, weights.arch.head_dim)
    return {
        f"block_kv_{layer}": GraphDef(
            (
                TensorDef("input_states", (1, max_input_length, hidden), act),
                TensorDef("position_ids", (1, max_input_length), "int32"),
                TensorDef("history_k", (1, prefill_kv_length, *kv), act),
                TensorDef("history_v", (1, prefill_kv_length, *kv), act),
            ),
            (
                TensorDef("hidden_states", (1, max_input_length, hidden), act),
                TensorDef("past_k", (1, max_input_length, *kv), act),
                TensorDef("past_v", (1, max_input_length, *kv), act),
            ),
            True,
            0,
            _block_kv(weights, layer),
        )
        for layer in range(weights.arch.num_layers)
    }


def _block_kv(weights: Weights, layer: int) -> Compute:
    def compute(io: list[np.ndarray]) -> list[np.ndarray]:
        hidden, positions, history_k, history_v = io
        length, start = hidden.shape[1], history_k.shape[1]
        mask = np.zeros((length, start + length), dtype=np.float32)
        mask[:, start:][np.triu(np.ones((length, length), dtype=bool), 1)] = MASK_VALUE
        out, k, v = decoder_layer(weights, layer, hidden[0], positions[0], mask, history_k[0], history_v[0])
        return [out[None], k[None], v[None]]

    return compute
