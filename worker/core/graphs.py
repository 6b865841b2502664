"""The graph contract of a compiled Qwen/Llama bmodel, which every backend implements.

A BM1684X bmodel is a set of graphs (sophon-demo `sample/Qwen`):
  embedding        input_ids [1, L] -> hidden [1, L, H]
  block_{i}        hidden, position_ids [1, L], mask [1, 1, L, L] -> hidden, k, v [1, L, kv_heads, dim]
                   (L up to the prefill length, SEQLEN unless compiled shorter)
  embedding_cache  one token -> hidden [1, 1, H]
  block_cache_{i}  hidden [1, 1, H], position [1, 1], mask [1, 1, 1, SEQLEN + 1], past k/v
                   [1, SEQLEN, kv_heads, dim] -> hidden, k, v of one position
  lm_head          hidden [1, 1, H] -> logits [V], or a token id when greedy is compiled in
  block_kv_{i}     optional (LLM-TPU `--use_history_kv`): prefill L new positions after `start`
                   cached ones, attending to the cached k/v as history -> hidden, k, v of the new ones

The generation driver (driver.py) owns positions, masks, KV-cache offsets and the SEQLEN limit;
a backend only runs graphs and keeps its KV cache where its hardware wants it (numpy arrays on
the CPU, device memory on the chip). Hidden states are opaque handles passed back unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# Additive attention-mask value for a hidden position, as the bmodels are compiled with
# (fp16 -10000; its bf16 bit pattern is 50716). Backends convert it to their input dtype.
MASK_VALUE = -10000.0

Hidden = Any  # a backend's own handle for a hidden-state tensor


class HeadKind(enum.Enum):
    LOGITS = "logits"  # lm_head returns float32 logits [V]: the host samples
    TOKEN_ID = "token_id"  # greedy compiled into lm_head: no host-side sampling possible


@dataclass(frozen=True)
class GraphSpec:
    seq_len: int  # SEQLEN: KV-cache capacity, the longest prompt + answer
    num_layers: int
    is_dynamic: bool  # prefill may run at the prompt's length instead of padding to prefill_length
    head: HeadKind
    # The prefill graphs' length when compiled shorter than seq_len (LLM-TPU's MAX_INPUT_LENGTH):
    # the longest prompt. 0: seq_len.
    max_input_length: int = 0
    # lm_head's logits can be reduced to the greedy token on the device (a `greedy_head` graph):
    # greedy requests then call greedy_token instead of lm_head.
    device_greedy: bool = False
    # The most cached positions block_with_history can attend to (LLM-TPU's PREFILL_KV_LENGTH);
    # 0 = the backend has no prefill-with-history graph, so every prompt is prefilled from 0.
    max_history: int = 0

    @property
    def prefill_length(self) -> int:
        return self.max_input_length or self.seq_len


class ModelGraphs(Protocol):
    spec: GraphSpec

    def embedding(self, input_ids: np.ndarray) -> Hidden:
        """input_ids int32 [1, L] -> hidden [1, L, H]."""

    def block(self, layer: int, hidden: Hidden, position_ids: np.ndarray, mask: np.ndarray) -> Hidden:
        """Prefill one layer over L positions (position_ids int32 [1, L], mask float32
        [1, 1, L, L]); stores the layer's k/v for positions 0..L-1 in the KV cache."""

    def embedding_cache(self, token_id: int) -> Hidden:
        """One token -> hidden [1, 1, H]."""

    def block_cache(self, layer: int, hidden: Hidden, position: int, mask: np.ndarray) -> Hidden:
        """Decode one position (mask float32 [1, 1, 1, seq_len + 1], the last entry being the
        new token itself): attends over the cached positions, writes k/v at `position`."""

    def lm_head(self, hidden: Hidden, index: int) -> np.ndarray:
        """The head on row `index` of hidden: float32 logits [V], or int32 [1] token id."""

    def greedy_token(self, hidden: Hidden, index: int) -> int:
        """The most probable next token of row `index`, chosen on the device; called only when
        spec.device_greedy."""

    def block_with_history(
        self, layer: int, hidden: Hidden, position_ids: np.ndarray, mask: np.ndarray, start: int
    ) -> Hidden:
        """Prefill one layer over L new positions that follow `start` cached ones (only when
        spec.max_history >= start > 0): position_ids int32 [1, L] (start..start+L-1), mask float32
        [1, 1, L, start + L] whose columns are the cached rows 0..start-1 then the L new positions.
        Reads cache rows 0..start-1 only and writes the new k/v at rows start..start+L-1."""

    def reset(self) -> None:
        """Forget all cached keys/values (zero the KV cache); called after a failed generation,
        whose last step may have stopped half-way through writing it."""
