"""The prefill-with-history graph on the chip: LLM-TPU's `block_kv_{i}`, when the bmodel has them.

LLM-TPU's `llm_convert.py --use_history_kv` adds one `block_kv_{i}` per layer (docs/LLM_Convert_Pipeline.md,
"The bmodel <-> demo contract"; README "Prefill with KV Cache"). It forces `--dynamic`; its inputs are
input_states [1, L, H], position_ids [1, L], history_k and history_v [1, PREFILL_KV_LENGTH,
kv_heads, dim], launched with the history inputs cut to the cached length; the mask (every cached
position, then causal over the new ones) is compiled in; the outputs are the hidden states and the
new positions' k/v. Its demos (models/Qwen3/python_demo/chat.cpp `forward_first_with_kv` and
`net_launch_kv_dyn`, models/InternVL3/python_demo/chat.cpp) copy the cache's first old_length rows
into the history inputs and the outputs back at row old_length. Here, as `block_cache_{i}` already
does for its one row, the history inputs are views of the KV cache's first `start` rows and the k/v
outputs views at row `start`: no copies. PREFILL_KV_LENGTH bounds the reusable prefix (max_history).

A bmodel without these graphs (sophon-demo's exports), or compiled for several devices, keeps
max_history 0: every prompt is prefilled from token 0, as before. Kept apart from sail_graphs.py
as a subclass, so the adapter itself stays as it is.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np

from worker.core.sail_graphs import SailGraphs, Tensor, _Hidden

log = logging.getLogger(__name__)

HISTORY_GRAPH = "block_kv_0"
# input_states, position_ids, history_k, history_v: the layout LLM-TPU's demos launch (mask compiled in)
_HISTORY_INPUTS = 4


class SailHistoryGraphs(SailGraphs):
    """SailGraphs plus block_with_history over the bmodel's block_kv_{i} graphs, if it has them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._history_step: tuple[np.ndarray, list[Tensor]] | None = None  # layer 0's positions
        problem = self._history_problem()
        if problem:
            if HISTORY_GRAPH in self._engine.get_graph_names():
                log.warning("%s: %s: history prefill not used", self._name, problem)
            return
        self._history_positions = self._per_device(HISTORY_GRAPH, "input", 1, _HISTORY_INPUTS)
        self._max_new_positions = self._engine.get_input_shape(HISTORY_GRAPH, 0)[1]  # max_input_length
        prefill_kv_length = self._engine.get_input_shape(HISTORY_GRAPH, 2)[1]
        self.spec = replace(self.spec, max_history=min(prefill_kv_length, self.spec.seq_len - 1))

    def _history_problem(self) -> str:
        """Why the bmodel's history graphs cannot be used ("" if they can)."""
        engine = self._engine
        if HISTORY_GRAPH not in engine.get_graph_names():
            return "no history graphs"
        if self._layout.devices != 1:
            return "history graphs of a bmodel compiled for several devices are not supported"
        if engine.get_input_num(HISTORY_GRAPH) != _HISTORY_INPUTS or not engine.get_is_dynamic(HISTORY_GRAPH):
            inputs = engine.get_input_num(HISTORY_GRAPH)
            return f"{HISTORY_GRAPH} has {inputs} inputs (expected {_HISTORY_INPUTS}, dynamic)"
        return ""

    def block_with_history(
        self, layer: int, hidden: _Hidden, position_ids: np.ndarray, mask: np.ndarray, start: int
    ) -> _Hidden:
        length = hidden.length
        if (
            not 0 < start <= self.spec.max_history
            or start + length > self.spec.seq_len
            or length > self._max_new_positions
        ):
            raise ValueError(
                f"prefill of {length} positions after {start} cached ones does not fit (history up "
                f"to {self.spec.max_history}, {self._max_new_positions} new positions, "
                f"seq_len {self.spec.seq_len})"
            )
        if position_ids.shape != (1, length) or mask.shape != (1, 1, length, start + length):
            raise ValueError(
                f"position_ids {position_ids.shape} / mask {mask.shape} do not fit {length} positions"
            )
        (past_k, past_v), (view,) = self._kv[layer][0], hidden.views
        _, _, kv_heads, dim = self._layout.kv_shape
        history, new = [1, start, kv_heads, dim], [1, length, kv_heads, dim]
        sail = self._sail
        inputs = [view, self._positions(layer, position_ids)]
        inputs += [sail.Tensor(past_k, history, 0), sail.Tensor(past_v, history, 0)]
        offset = start * kv_heads * dim
        outputs = [view, sail.Tensor(past_k, new, offset), sail.Tensor(past_v, new, offset)]
        self._run(f"block_kv_{layer}", inputs, outputs)
        return hidden

    def reset(self) -> None:
        super().reset()
        self._history_step = None

    def _positions(self, layer: int, position_ids: np.ndarray) -> Tensor:
        """Written by layer 0; the other layers of the step get the same array from the driver."""
        if layer > 0 and self._history_step is not None and self._history_step[0] is position_ids:
            return self._history_step[1][0]
        views = self._write_all(self._history_positions, position_ids)
        self._history_step = (position_ids, views)
        return views[0]
