"""The `sail` backend: the bmodel graph contract run on BM1684X chips through sophon-sail's EngineLLM.

A thin adapter: the driver decides positions, masks and KV-cache offsets; this only moves arrays
between the host and device memory and launches graphs. The layout is read and checked at load
(sail_layout.py) and follows sophon-demo's sample/Qwen/python/qwen.py:
- every graph input and output it writes is a device buffer allocated here once at the graph's max
  shape (`own_dev_data`, so zeroed and without a host mirror on PCIe and SoC alike), used through
  views at element offsets (`sail.Tensor(src, shape, offset)`): prefill hidden states stay on the
  device from graph to graph, and lm_head reads one row of them in place;
- layer i's KV cache is [1, SEQLEN, kv_heads, dim] per device: block_i writes rows 0..L-1 through a
  view at offset 0; block_cache_i reads all of it and writes row `position` through a view there.
  A static bmodel whose block_caches are io_alone (addr mode 1) keeps the cache in block_cache_i's
  own history_k/history_v inputs (no second copy of the largest buffers); otherwise the cache is
  allocated here, as qwen.py does for dynamic bmodels. Either way it is zeroed at load and on reset
  by a device-side fill (`Tensor.zeros`, bm_memset_device_ext in sophon-sail src/tensor.cpp): the
  runtime never clears io_alone memory (LLM-TPU's models/Qwen2_5/python_demo/chat.cpp empties the
  nets itself), and on SoC `update_data` would write only the tensor's host mirror.
- positions and masks are written once per step, by layer 0; the other layers reuse them
  (as qwen.py does), so no per-layer host work.
A bmodel compiled for N devices (sophon-demo's `2dev` models) takes one device group: every input
and output of the embeddings and blocks is repeated per device, in qwen.py's index order.
One instance per worker: it owns the engine, the buffers and the KV cache, one generation at a time.
`sophon.sail` is imported only here, when a SailGraphs is built.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from common.devices import DeviceGroup, format_group
from worker.core.graphs import GraphSpec, HeadKind
from worker.core.request import EngineError
from worker.core.sail_layout import (
    EMBEDDING,
    EMBEDDING_CACHE,
    GREEDY_HEAD,
    LM_HEAD,
    Layout,
    read_layout,
)

log = logging.getLogger(__name__)

SAIL_MISSING = (
    "sophon-sail is not installed: the sail engine needs the chip's SDK (the sophon-sail wheel of "
    "Sophgo's libsophon release, installed into this Python) and a BM1684X; use the numpy engine "
    "on a machine without the chip"
)
# The view constructor Tensor(src, shape, offset, no_copy) is bound from sophon-sail 3.9.1 on
# (absent from 3.9.0's src/bind.cpp); every step of this adapter uses it.
MIN_SAIL_VERSION = "3.9.1"

Tensor = Any  # a sophon.sail.Tensor: device memory with a shape and a dtype


class SailNotInstalledError(RuntimeError):
    """sophon.sail cannot be imported on this machine."""


class SailTooOldError(RuntimeError):
    """The installed sophon-sail lacks a call the adapter needs."""


class SailLoadError(RuntimeError):
    """EngineLLM could not load the bmodel on the device group."""


def import_sail() -> ModuleType:
    try:
        return importlib.import_module("sophon.sail")
    except ImportError as error:
        raise SailNotInstalledError(f"{SAIL_MISSING} (import error: {error})") from error


def sail_version(sail: ModuleType) -> str:
    return str(getattr(sail, "__version__", "unknown"))


def has_view_overload(sail: ModuleType, handle: Any) -> bool:
    """Whether Tensor(src, shape, offset) exists: tried once on a one-element buffer."""
    buffer = sail.Tensor(handle, [1], sail.Dtype.BM_INT32, False, True)
    try:
        sail.Tensor(buffer, [1], 0)
    except TypeError:  # pybind11: no overload takes these arguments
        return False
    return True


@dataclass
class _Hidden:
    """Hidden states on the device: one view per device of the group, [1, length, H] each."""

    views: list[Tensor]
    length: int


class SailGraphs:
    """ModelGraphs on one device group; hidden-state handles are device tensors."""

    def __init__(self, bmodel_path: str | Path, devices: int | DeviceGroup = 0) -> None:
        path = Path(bmodel_path)
        if not path.is_file():
            raise FileNotFoundError(f"bmodel not found: {path}")
        group = (devices,) if isinstance(devices, int) else tuple(devices)
        self._sail = import_sail()
        self._name = f"{path.name} on device {format_group(group)}"
        # The engine first: it raises on a bad DEV_ID, where sail.Handle would exit the process.
        self._engine = self._load_engine(path, group)
        self._handles = [self._sail.Handle(device) for device in group]
        if not hasattr(self._sail.Tensor, "zeros") or not has_view_overload(self._sail, self._handles[0]):
            raise SailTooOldError(
                f"sophon-sail {sail_version(self._sail)} is too old: the sail engine needs sophon-sail "
                f">= {MIN_SAIL_VERSION} (Tensor(src, shape, offset) views and Tensor.zeros); install the "
                "sophon-sail wheel of a newer SDK release"
            )
        self._layout = layout = read_layout(self._engine, self._sail.Dtype, self._name, len(group))
        self.spec = GraphSpec(
            seq_len=layout.seq_len,
            num_layers=layout.num_layers,
            is_dynamic=layout.is_dynamic,
            head=HeadKind.TOKEN_ID if layout.head_is_token else HeadKind.LOGITS,
            max_input_length=layout.prefill_length if layout.prefill_length < layout.seq_len else 0,
            device_greedy=layout.has_greedy_head,
        )
        self._allocate(layout)
        self._step_inputs: tuple[object, ...] | None = None  # what layer 0 of this step wrote
        self._zero_kv()

    def _load_engine(self, path: Path, group: DeviceGroup) -> Any:
        try:
            return self._sail.EngineLLM(str(path), list(group))
        except Exception as error:  # sail says only "EngineLLM related error!" (src/engine_llm.cpp)
            raise SailLoadError(
                f"sophon-sail could not load {self._name}: {type(error).__name__}: {error} (are the "
                f"device ids right, and was the bmodel compiled for {len(group)} device(s)? A bmodel "
                'for N devices needs a group of N chips, e.g. workers.devices: ["0,1"])'
            ) from error

    def _allocate(self, layout: Layout) -> None:
        """The device buffers of every input the adapter writes and every output it reads."""
        self._prefill_ids = self._per_device(EMBEDDING, "input", 0, 1)
        self._embedded = self._per_device(EMBEDDING, "output", 0, 1)
        self._prefill_hidden = (
            self._per_device("block_0", "input", 0, 3) if layout.convert_embedding else self._embedded
        )
        self._prefill_positions = self._per_device("block_0", "input", 1, 3)
        self._prefill_mask = self._per_device("block_0", "input", 2, 3)
        self._decode_ids = self._per_device(EMBEDDING_CACHE, "input", 0, 1)
        self._decode_embedded = self._per_device(EMBEDDING_CACHE, "output", 0, 1)
        self._decode_hidden = (
            self._per_device("block_cache_0", "input", 0, 5)
            if layout.convert_embedding
            else self._decode_embedded
        )
        self._decode_position = self._per_device("block_cache_0", "input", 1, 5)
        self._decode_mask = self._per_device("block_cache_0", "input", 2, 5)
        self._head_input = self._buffer(LM_HEAD, "input", 0, 0) if layout.convert_head else None
        self._head_output = self._buffer(LM_HEAD, "output", 0, 0)
        self._greedy_output = self._buffer(GREEDY_HEAD, "output", 0, 0) if layout.has_greedy_head else None
        self._kv = [
            [self._kv_pair(layer, device) for device in range(layout.devices)]
            for layer in range(layout.num_layers)
        ]

    # --- the graph contract ---

    def embedding(self, input_ids: np.ndarray) -> _Hidden:
        length = self._prefill_length(input_ids)
        ids = self._write_all(self._prefill_ids, input_ids)
        embedded = self._views(self._embedded, [1, length, self._layout.hidden_size])
        self._run(EMBEDDING, ids, embedded)
        hidden = self._views(self._prefill_hidden, [1, length, self._layout.hidden_size])
        if self._layout.convert_embedding:
            self._convert(embedded, hidden)
        return _Hidden(hidden, length)

    def block(self, layer: int, hidden: _Hidden, position_ids: np.ndarray, mask: np.ndarray) -> _Hidden:
        length = hidden.length
        _expect_shape("position_ids", position_ids, (1, length))
        _expect_shape("mask", mask, (1, 1, length, length))
        positions, masks = self._step(
            layer, position_ids, position_ids, mask, (self._prefill_positions, self._prefill_mask)
        )
        rows = [1, length, *self._layout.kv_shape[2:]]
        inputs, outputs = [], []
        for device, view in enumerate(hidden.views):
            past_k, past_v = self._kv[layer][device]
            inputs += [view, positions[device], masks[device]]
            outputs += [view, self._sail.Tensor(past_k, rows, 0), self._sail.Tensor(past_v, rows, 0)]
        self._run(f"block_{layer}", inputs, outputs)
        return hidden

    def embedding_cache(self, token_id: int) -> _Hidden:
        ids = self._write_all(self._decode_ids, np.array([[token_id]], dtype=np.int32))
        self._run(EMBEDDING_CACHE, ids, self._decode_embedded)
        if self._layout.convert_embedding:
            self._convert(self._decode_embedded, self._decode_hidden)
        return _Hidden(list(self._decode_hidden), 1)

    def block_cache(self, layer: int, hidden: _Hidden, position: int, mask: np.ndarray) -> _Hidden:
        seq_len = self.spec.seq_len
        if not 0 <= position < seq_len:
            raise ValueError(f"decode position {position} is outside the KV cache (seq_len {seq_len})")
        _expect_shape("mask", mask, (1, 1, 1, seq_len + 1))
        positions, masks = self._step(
            layer,
            position,
            np.array([[position]], dtype=np.int32),
            mask,
            (self._decode_position, self._decode_mask),
        )
        _, _, kv_heads, dim = self._layout.kv_shape
        row, offset = [1, 1, kv_heads, dim], position * kv_heads * dim
        inputs, outputs = [], []
        for device, view in enumerate(hidden.views):
            past_k, past_v = self._kv[layer][device]
            inputs += [view, positions[device], masks[device], past_k, past_v]
            new_k, new_v = self._sail.Tensor(past_k, row, offset), self._sail.Tensor(past_v, row, offset)
            outputs += [view, new_k, new_v]
        self._run(f"block_cache_{layer}", inputs, outputs)
        return hidden

    def lm_head(self, hidden: _Hidden, index: int) -> np.ndarray:
        self._run_head(hidden, index)
        values = self._head_output.asnumpy()
        if self.spec.head is HeadKind.TOKEN_ID:
            return _first_token(values)
        return _to_float32(self._sail, values, self._layout.head_dtype).reshape(-1)

    def greedy_token(self, hidden: _Hidden, index: int) -> int:
        """lm_head, then greedy_head on its logits in device memory: 4 bytes reach the host
        (LLM-TPU models/Qwen2_5/python_demo/chat.cpp greedy_search; qwen.py's is_sample path)."""
        self._run_head(hidden, index)
        if self._greedy_output is None:
            return int(_first_token(self._head_output.asnumpy())[0])
        self._run(GREEDY_HEAD, [self._head_output], [self._greedy_output])
        return int(_first_token(self._greedy_output.asnumpy())[0])

    def reset(self) -> None:
        """Zero every layer's KV cache in device memory; the next step writes all its host inputs:
        a failed step may have left any of them half-written."""
        self._step_inputs = None
        self._zero_kv()

    # --- for scripts/chip_check.py ---

    def read_kv(self, layer: int) -> list[np.ndarray]:
        """Layer `layer`'s k and v caches of every device as the device holds them (raw bits)."""
        arrays = []
        for past_k, past_v in self._kv[layer]:
            for tensor in (past_k, past_v):
                tensor.sync_d2s()  # a no-op without a host mirror; on SoC it refreshes the mirror
                arrays.append(tensor.asnumpy())
        return arrays

    @property
    def layout(self) -> Layout:
        return self._layout

    @property
    def engine(self) -> Any:
        """The sail.EngineLLM, for a diagnostic's read-only look at its graphs."""
        return self._engine

    # --- inside ---

    def _run_head(self, hidden: _Hidden, index: int) -> None:
        if not 0 <= index < hidden.length:
            raise ValueError(f"lm_head row {index} is outside the hidden states of {hidden.length} positions")
        row = self._sail.Tensor(
            hidden.views[0], self._layout.head_input_shape, index * self._layout.hidden_size
        )
        if self._head_input is not None:
            self._convert([row], [self._head_input])
            row = self._head_input
        self._run(LM_HEAD, [row], [self._head_output])

    def _step(
        self,
        layer: int,
        position: object,
        position_ids: np.ndarray,
        mask: np.ndarray,
        buffers: tuple[list[Tensor], list[Tensor]],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The position and mask views of this step: written by layer 0, reused by the other
        layers when they are given the same position and the same mask array (the driver's way),
        written again otherwise."""
        if layer > 0 and self._step_inputs is not None:
            written_position, written_mask, positions, masks = self._step_inputs
            if written_mask is mask and _same(written_position, position):
                return positions, masks
        positions, masks = self._write_all(buffers[0], position_ids), self._write_all(buffers[1], mask)
        self._step_inputs = (position, mask, positions, masks)
        return positions, masks

    def _write_all(self, buffers: list[Tensor], values: np.ndarray) -> list[Tensor]:
        """`values` written into a view of their shape at the start of every device's buffer."""
        device_values = _to_device(self._sail, values, buffers[0].dtype())
        views = self._views(buffers, list(values.shape))
        for view in views:
            view.update_data(device_values)
        return views

    def _views(self, buffers: list[Tensor], shape: list[int]) -> list[Tensor]:
        return [self._sail.Tensor(buffer, shape, 0) for buffer in buffers]

    def _convert(self, sources: list[Tensor], targets: list[Tensor]) -> None:
        """Hidden states from one graph's dtype into the next graph's, through the host (an
        embedding compiled BF16 beside F16 blocks, as sophon-demo's gen_bmodel.sh makes them)."""
        for source, target in zip(sources, targets, strict=True):
            values = _to_float32(self._sail, source.asnumpy(), source.dtype())
            target.update_data(_to_device(self._sail, values.reshape(target.shape()), target.dtype()))

    def _prefill_length(self, input_ids: np.ndarray) -> int:
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [1, L], got shape {input_ids.shape}")
        length, longest = input_ids.shape[1], self._layout.prefill_length
        if not self.spec.is_dynamic and length != longest:
            raise ValueError(
                f"{self._name} is static: prefill runs at {longest} positions (padded), got {length}"
            )
        if length > longest:
            raise ValueError(f"prefill of {length} positions exceeds the bmodel's {longest}")
        return length

    def _run(self, graph: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> None:
        try:
            # Returns None and raises on failure (src/engine_llm.cpp: void process, SAIL_CHECK_RET).
            self._engine.process(graph, dict(enumerate(inputs)), dict(enumerate(outputs)))
        except Exception as error:  # SailEngineError, SailTensorError...: registered, derived from Exception
            raise EngineError(
                f"{self._name}: graph {graph} failed: {type(error).__name__}: {error}"
            ) from error

    def _kv_pair(self, layer: int, device: int) -> tuple[Tensor, Tensor]:
        graph, base = f"block_cache_{layer}", 5 * device
        if self._layout.kv_in_runtime_memory:
            own = self._engine.get_input_tensors(graph)
            return own[base + 3], own[base + 4]
        return self._buffer(graph, "input", base + 3, device), self._buffer(graph, "input", base + 4, device)

    def _zero_kv(self) -> None:
        for pairs in self._kv:
            for past_k, past_v in pairs:
                past_k.zeros()
                past_v.zeros()

    def _per_device(self, graph: str, side: str, index: int, stride: int) -> list[Tensor]:
        return [
            self._buffer(graph, side, stride * device + index, device) for device in range(len(self._handles))
        ]

    def _buffer(self, graph: str, side: str, index: int, device: int) -> Tensor:
        """Device memory for a graph input or output at its max shape (zeroed by sail, no mirror)."""
        if side == "input":
            shape, dtype = (
                self._engine.get_input_shape(graph, index),
                self._engine.get_input_dtype(graph, index),
            )
        else:
            shape, dtype = (
                self._engine.get_output_shape(graph, index),
                self._engine.get_output_dtype(graph, index),
            )
        return self._sail.Tensor(self._handles[device], shape, dtype, False, True)


def _same(a: object, b: object) -> bool:
    """The same decode position (an int), or the very same prefill position array."""
    return a == b if isinstance(a, int) else a is b


def _first_token(values: np.ndarray) -> np.ndarray:
    """A token-id head's output ([1], [1, 1], or top-k ids [1, K] best first) as int32 [1]."""
    return values.reshape(-1)[:1].astype(np.int32)


def _to_device(sail: ModuleType, values: np.ndarray, dtype: Any) -> np.ndarray:
    """Host values in a graph input's dtype; sail takes 16-bit floats as their raw bits."""
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
    raise ValueError(f"unsupported graph output dtype {dtype}")


def _expect_shape(what: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{what} must have shape {list(shape)}, got {list(array.shape)}")
