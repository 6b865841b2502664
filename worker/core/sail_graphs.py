"""The `sail` backend: the bmodel graph contract run on a BM1684X through sophon-sail's EngineLLM.

A thin adapter: the driver decides positions, masks and KV-cache offsets; this only moves arrays
between the host and device memory and launches graphs. The device layout follows sophon-demo's
sample/Qwen (python/qwen.py, cpp/qwen_bmlib/qwen.cpp):
- every graph input and output is a device buffer allocated here once at the graph's max shape,
  used through views at element offsets (`sail.Tensor(src, shape, offset)`): prefill hidden states
  stay on the device from graph to graph, and lm_head reads one row of them in place;
- layer i's KV cache is [1, seq_len, kv_heads, dim]: block_i writes rows 0..L-1 through a view at
  offset 0; block_cache_i reads all of it and writes row `position` through a view there;
- in addr mode 1 ("io_alone") the runtime has already allocated every graph's IO memory, and
  block_cache_i's own history_k/history_v inputs hold the cache (no second copy of the largest
  buffers); in addr mode 0 a graph's IO memory is shared with other graphs, so the cache is
  allocated here.
One instance per worker: it owns the engine, the buffers and the KV cache, one generation at a time.
`sophon.sail` is imported only here, when a SailGraphs is built.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from worker.core.graphs import GraphSpec, HeadKind
from worker.core.request import EngineError

SAIL_MISSING = (
    "sophon-sail is not installed: the sail engine needs the chip's SDK (the sophon-sail wheel of "
    "Sophgo's libsophon release, installed into this Python) and a BM1684X; use the numpy engine "
    "on a machine without the chip"
)

EMBEDDING = "embedding"
EMBEDDING_CACHE = "embedding_cache"
LM_HEAD = "lm_head"
_BLOCK_NAME = re.compile(r"block_\d+")
_LAYER_INPUTS = 3  # hidden, position_ids, mask: a block graph of a bmodel compiled for one device

Tensor = Any  # a sophon.sail.Tensor: device memory with a shape and a dtype


class SailNotInstalledError(RuntimeError):
    """sophon.sail cannot be imported on this machine."""


def import_sail() -> ModuleType:
    try:
        return importlib.import_module("sophon.sail")
    except ImportError as error:
        raise SailNotInstalledError(f"{SAIL_MISSING} (import error: {error})") from error


class SailGraphs:
    """ModelGraphs on one device; hidden-state handles are device tensors."""

    def __init__(self, bmodel_path: str | Path, dev_id: int = 0) -> None:
        path = Path(bmodel_path)
        if not path.is_file():
            raise FileNotFoundError(f"bmodel not found: {path}")
        self._sail = import_sail()
        # The engine first: it raises on a bad DEV_ID, where sail.Handle would exit the process.
        self._engine = self._sail.EngineLLM(str(path), [dev_id])
        self._handle = self._sail.Handle(dev_id)
        self._name = f"{path.name} on device {dev_id}"
        num_layers = _layer_count(self._engine.get_graph_names(), self._name)
        if self._engine.get_input_num("block_0") != _LAYER_INPUTS:
            raise ValueError(f"{self._name}: compiled for several devices; a worker runs a 1-device bmodel")
        self._kv_shape = self._engine.get_input_shape("block_cache_0", 3)  # [1, seq_len, kv_heads, dim]
        self._kv_dtype = self._engine.get_input_dtype("block_cache_0", 3)
        self._hidden_size = self._engine.get_output_shape(EMBEDDING_CACHE, 0)[-1]
        self._head_dtype = self._engine.get_output_dtype(LM_HEAD, 0)
        head = HeadKind.TOKEN_ID if self._head_dtype == self._sail.Dtype.BM_INT32 else HeadKind.LOGITS
        self.spec = GraphSpec(
            seq_len=self._kv_shape[1],
            num_layers=num_layers,
            is_dynamic=self._engine.get_is_dynamic("block_0"),
            head=head,
        )
        self._prefill_ids = self._input(EMBEDDING, 0)
        self._prefill_hidden = self._output_buffer(EMBEDDING)
        self._prefill_positions = self._input("block_0", 1)
        self._prefill_mask = self._input("block_0", 2)
        self._decode_ids = self._input(EMBEDDING_CACHE, 0)
        self._decode_hidden = self._output_buffer(EMBEDDING_CACHE)
        self._decode_position = self._input("block_cache_0", 1)
        self._decode_mask = self._input("block_cache_0", 2)
        self._head_row_shape = self._engine.get_input_shape(LM_HEAD, 0)  # [1, H] or [1, 1, H]
        self._head_output = self._output_buffer(LM_HEAD)
        self._kv = [self._kv_cache(layer) for layer in range(num_layers)]
        self._host_inputs = (
            self._prefill_ids,
            self._prefill_positions,
            self._prefill_mask,
            self._decode_ids,
            self._decode_position,
            self._decode_mask,
        )

    def embedding(self, input_ids: np.ndarray) -> Tensor:
        length = self._prefill_length(input_ids)
        hidden = self._sail.Tensor(self._prefill_hidden, [1, length, self._hidden_size], 0)
        self._run(EMBEDDING, [self._prefill_ids.put(input_ids)], [hidden])
        return hidden

    def block(self, layer: int, hidden: Tensor, position_ids: np.ndarray, mask: np.ndarray) -> Tensor:
        length = hidden.shape()[1]
        _expect_shape("position_ids", position_ids, (1, length))
        _expect_shape("mask", mask, (1, 1, length, length))
        past_k, past_v = self._kv[layer]
        rows = [1, length, *self._kv_shape[2:]]
        inputs = [hidden, self._prefill_positions.put(position_ids), self._prefill_mask.put(mask)]
        outputs = [hidden, self._sail.Tensor(past_k, rows, 0), self._sail.Tensor(past_v, rows, 0)]
        self._run(f"block_{layer}", inputs, outputs)
        return hidden

    def embedding_cache(self, token_id: int) -> Tensor:
        ids = self._decode_ids.put(np.array([[token_id]], dtype=np.int32))
        self._run(EMBEDDING_CACHE, [ids], [self._decode_hidden])
        return self._decode_hidden

    def block_cache(self, layer: int, hidden: Tensor, position: int, mask: np.ndarray) -> Tensor:
        if not 0 <= position < self.spec.seq_len:
            raise ValueError(
                f"decode position {position} is outside the KV cache (seq_len {self.spec.seq_len})"
            )
        _expect_shape("mask", mask, (1, 1, 1, self.spec.seq_len + 1))
        past_k, past_v = self._kv[layer]
        row, offset = [1, 1, *self._kv_shape[2:]], position * self._kv_shape[2] * self._kv_shape[3]
        position_ids = self._decode_position.put(np.array([[position]], dtype=np.int32))
        inputs = [hidden, position_ids, self._decode_mask.put(mask), past_k, past_v]
        outputs = [hidden, self._sail.Tensor(past_k, row, offset), self._sail.Tensor(past_v, row, offset)]
        self._run(f"block_cache_{layer}", inputs, outputs)
        return hidden

    def lm_head(self, hidden: Tensor, index: int) -> np.ndarray:
        length = hidden.shape()[1]
        if not 0 <= index < length:
            raise ValueError(f"lm_head row {index} is outside the hidden states of {length} positions")
        row = self._sail.Tensor(hidden, self._head_row_shape, index * self._hidden_size)
        self._run(LM_HEAD, [row], [self._head_output])
        values = self._head_output.asnumpy()
        if self.spec.head is HeadKind.TOKEN_ID:
            return values.reshape(-1)[:1].astype(np.int32)
        return _to_float32(self._sail, values, self._head_dtype).reshape(-1)

    def reset(self) -> None:
        """Zero every layer's KV cache in device memory, and rewrite every host input on its next use:
        a failed step may have left any of them half-written."""
        zeros = _to_device(self._sail, np.zeros(self._kv_shape, dtype=np.float32), self._kv_dtype)
        for past_k, past_v in self._kv:
            past_k.update_data(zeros)
            past_v.update_data(zeros)
        for host_input in self._host_inputs:
            host_input.forget()

    def _prefill_length(self, input_ids: np.ndarray) -> int:
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [1, L], got shape {input_ids.shape}")
        length, seq_len = input_ids.shape[1], self.spec.seq_len
        if not self.spec.is_dynamic and length != seq_len:
            raise ValueError(
                f"{self._name} is static: prefill runs at seq_len {seq_len} (padded), got {length}"
            )
        if length > seq_len:
            raise ValueError(f"prefill of {length} positions exceeds seq_len {seq_len}")
        return length

    def _run(self, graph: str, inputs: list[Tensor], outputs: list[Tensor]) -> None:
        try:
            status = self._engine.process(graph, dict(enumerate(inputs)), dict(enumerate(outputs)))
        except Exception as error:  # sail's own error types (pybind11-registered) derive from Exception
            raise EngineError(f"{self._name}: graph {graph} failed: {error}") from error
        if status:
            raise EngineError(f"{self._name}: graph {graph} failed with status {status}")

    def _input(self, graph: str, index: int) -> _HostInput:
        return _HostInput(
            self._sail, self._input_buffer(graph, index), self._engine.get_input_dtype(graph, index)
        )

    def _kv_cache(self, layer: int) -> tuple[Tensor, Tensor]:
        graph = f"block_cache_{layer}"
        if self._engine.get_addr_mode(graph) == 1:
            own = self._engine.get_input_tensors(graph)
            return own[3], own[4]
        return self._input_buffer(graph, 3), self._input_buffer(graph, 4)

    def _input_buffer(self, graph: str, index: int) -> Tensor:
        """Device memory for a graph input at its max shape (zeroed by sail)."""
        shape, dtype = self._engine.get_input_shape(graph, index), self._engine.get_input_dtype(graph, index)
        return self._sail.Tensor(self._handle, shape, dtype, False, True)

    def _output_buffer(self, graph: str) -> Tensor:
        shape, dtype = self._engine.get_output_shape(graph, 0), self._engine.get_output_dtype(graph, 0)
        return self._sail.Tensor(self._handle, shape, dtype, False, True)


class _HostInput:
    """A graph input written from the host into a device buffer of the input's max shape, through a
    view of the step's shape. The copy is skipped when the values are those already there: every
    layer of a step gets the same positions and mask, and only this object writes the buffer."""

    def __init__(self, sail: ModuleType, buffer: Tensor, dtype: Any) -> None:
        self._sail, self._buffer, self._dtype = sail, buffer, dtype
        self._view: Tensor | None = None
        self._values: np.ndarray | None = None

    def put(self, values: np.ndarray) -> Tensor:
        if (
            self._view is None
            or values.shape != self._values.shape
            or not np.array_equal(values, self._values)
        ):
            view = self._sail.Tensor(self._buffer, list(values.shape), 0)
            view.update_data(_to_device(self._sail, values, self._dtype))
            self._view, self._values = view, values.copy()
        return self._view

    def forget(self) -> None:
        """The buffer's contents are unknown: the next put writes it whatever the values."""
        self._view = self._values = None


def _to_device(sail: ModuleType, values: np.ndarray, dtype: Any) -> np.ndarray:
    """Host values in the graph input's dtype; sail takes 16-bit floats as their raw bits."""
    if dtype == sail.Dtype.BM_INT32:
        return values.astype(np.int32)
    if dtype == sail.Dtype.BM_FLOAT32:
        return values.astype(np.float32)
    if dtype == sail.Dtype.BM_FLOAT16:
        return values.astype(np.float16).view(np.uint16)
    if dtype == sail.Dtype.BM_BFLOAT16:
        # The top half of a float32 (the masks' -10000 becomes 50716, i.e. -9984).
        return (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    raise ValueError(f"unsupported graph input dtype {dtype}")


def _to_float32(sail: ModuleType, values: np.ndarray, dtype: Any) -> np.ndarray:
    """A graph output read back by asnumpy (16-bit floats arrive as raw bits) as float32."""
    if dtype == sail.Dtype.BM_FLOAT32:
        return values.astype(np.float32, copy=False)
    if dtype == sail.Dtype.BM_FLOAT16:
        return values.view(np.float16).astype(np.float32)
    if dtype == sail.Dtype.BM_BFLOAT16:
        return (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"unsupported lm_head output dtype {dtype}")


def _layer_count(graph_names: Iterable[str], name: str) -> int:
    """The number of decoder layers, checking that every graph the contract needs is there."""
    names = set(graph_names)
    layers = sum(1 for graph in names if _BLOCK_NAME.fullmatch(graph))
    required = {EMBEDDING, EMBEDDING_CACHE, LM_HEAD}
    required |= {f"block_{i}" for i in range(layers)} | {f"block_cache_{i}" for i in range(layers)}
    missing = sorted(required - names)
    if layers == 0 or missing:
        raise ValueError(f"{name}: not a Qwen/Llama bmodel: missing graphs {missing or ['block_0']}")
    return layers


def _expect_shape(what: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{what} must have shape {list(shape)}, got {list(array.shape)}")
