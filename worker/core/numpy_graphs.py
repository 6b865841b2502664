"""The bmodel graph contract computed on the CPU with numpy (the `numpy` backend).

The KV cache is two preallocated float32 arrays [layers, seq_len, kv_heads, dim] written in place:
no per-token concatenation. A decode step attends only over cache rows 0..position, so rows left
from an earlier request are never read; a new prefill rewrites the rows it uses. After a failed
generation `reset` zeroes the cache all the same, as on the chip.

`block_with_history` is the prefill-with-history graph (LLM-TPU's block_kv_i): a multi-turn
conversation keeps rows 0..start-1 from its previous turn and computes only the new positions.
"""

from __future__ import annotations

import numpy as np

from worker.core.checkpoint import Weights
from worker.core.graphs import GraphSpec, HeadKind
from worker.core.numpy_layers import attend, embed, finish_layer, head_logits, project_qkv


class NumpyGraphs:
    """ModelGraphs over a loaded checkpoint. Dynamic (prefill at the prompt's length) by default;
    `is_dynamic=False` behaves like a static bmodel, whose prefill always spans seq_len positions."""

    def __init__(self, weights: Weights, seq_len: int, is_dynamic: bool = True) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        arch = weights.arch
        self.weights = weights
        self.spec = GraphSpec(
            seq_len=seq_len,
            num_layers=arch.num_layers,
            is_dynamic=is_dynamic,
            head=HeadKind.LOGITS,
            max_history=seq_len - 1,
        )
        cache_shape = (arch.num_layers, seq_len, arch.num_kv_heads, arch.head_dim)
        self.k_cache = np.zeros(cache_shape, dtype=np.float32)
        self.v_cache = np.zeros(cache_shape, dtype=np.float32)

    def embedding(self, input_ids: np.ndarray) -> np.ndarray:
        return embed(self.weights, input_ids[0])

    def block(self, layer: int, hidden: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        length = hidden.shape[0]
        if length > self.spec.seq_len:
            raise ValueError(f"prefill of {length} positions exceeds seq_len {self.spec.seq_len}")
        weights = self.weights.layers[layer]
        q, k, v = project_qkv(weights, self.weights.arch, hidden, position_ids[0])
        self.k_cache[layer, :length] = k
        self.v_cache[layer, :length] = v
        return finish_layer(weights, self.weights.arch, hidden, attend(q, k, v, mask[0, 0]))

    def block_with_history(
        self, layer: int, hidden: np.ndarray, position_ids: np.ndarray, mask: np.ndarray, start: int
    ) -> np.ndarray:
        length = hidden.shape[0]
        if not 0 < start <= self.spec.max_history or start + length > self.spec.seq_len:
            raise ValueError(
                f"prefill of {length} positions after {start} cached ones does not fit the KV cache "
                f"(seq_len {self.spec.seq_len})"
            )
        weights = self.weights.layers[layer]
        q, k, v = project_qkv(weights, self.weights.arch, hidden, position_ids[0])
        end = start + length
        self.k_cache[layer, start:end] = k
        self.v_cache[layer, start:end] = v
        # Rows past `end` are never read: what an earlier conversation left there stays invisible.
        keys, values = self.k_cache[layer, :end], self.v_cache[layer, :end]
        return finish_layer(weights, self.weights.arch, hidden, attend(q, keys, values, mask[0, 0]))

    def embedding_cache(self, token_id: int) -> np.ndarray:
        return embed(self.weights, np.array([token_id]))

    def block_cache(self, layer: int, hidden: np.ndarray, position: int, mask: np.ndarray) -> np.ndarray:
        if not 0 <= position < self.spec.seq_len:
            raise ValueError(
                f"decode position {position} is outside the KV cache (seq_len {self.spec.seq_len})"
            )
        weights = self.weights.layers[layer]
        q, k, v = project_qkv(weights, self.weights.arch, hidden, np.array([position]))
        self.k_cache[layer, position] = k[0]
        self.v_cache[layer, position] = v[0]
        # The contract's mask is [past 0..seq_len-1, the new token]; here the new token sits at
        # `position` in the cache itself, so its mask entry moves there.
        visible = np.empty((1, position + 1), dtype=np.float32)
        visible[0, :position] = mask[0, 0, 0, :position]
        visible[0, position] = mask[0, 0, 0, -1]
        keys, values = self.k_cache[layer, : position + 1], self.v_cache[layer, : position + 1]
        return finish_layer(weights, self.weights.arch, hidden, attend(q, keys, values, visible))

    def lm_head(self, hidden: np.ndarray, index: int) -> np.ndarray:
        return head_logits(self.weights, hidden[index])

    def reset(self) -> None:
        self.k_cache.fill(0.0)
        self.v_cache.fill(0.0)
