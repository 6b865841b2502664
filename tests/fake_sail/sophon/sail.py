"""A stand-in for `sophon.sail` (tests only): the subset the sail adapter uses, computed on the CPU.

Tests put tests/fake_sail on sys.path; product code never imports this. Bmodels are the JSON
descriptions of `sophon._bmodel`, computed with the numpy layer math.

Published signatures followed (sophgo/sophon-sail, pyis/_basic.pyi and pyis/_engine_llm.pyi; the
C++ behind them in src/tensor.cpp and src/engine_llm.cpp):

  class Dtype(enum.Enum): BM_FLOAT32 = 0, BM_FLOAT16 = 1, BM_INT8 = 2, BM_UINT8 = 3, BM_INT16 = 4,
                          BM_UINT16 = 5, BM_INT32 = 6, BM_UINT32 = 7, BM_BFLOAT16 = 8
  class Handle:
      def __init__(self, dev_id: int)
  class Tensor:  (pybind11 overloads)
      def __init__(self, handle: Handle, shape: list[int], dtype: Dtype = Dtype.BM_FLOAT32,
                   own_sys_data: bool = False, own_dev_data: bool = False)
      def __init__(self, src: Tensor, shape: list[int], offset: int, no_copy: bool = True)
          a view reusing src's device memory from `offset` (in elements, not bytes); the view must
          fit inside src ("size out of range")
      def shape(self) -> list[int]
      def update_data(self, data: numpy.ndarray) -> None
          data's shape must equal the tensor's; F16/BF16 tensors take raw 16-bit patterns
          (`.view(np.uint16)`, as sophon-demo's qwen.py feeds its masks)
      def asnumpy(self, shape: list[int] = None) -> numpy.ndarray
          F16/BF16 tensors come back as uint16 bit patterns
  class EngineLLM:
      def __init__(self, bmodel_path: str, dev_ids: list[int])
      def get_graph_names(self) -> list[str]
      def get_addr_mode(self, graph_name: str) -> int      1: the runtime allocated the graph's IO
      def get_is_dynamic(self, graph_name: str) -> bool
      def get_input_num(self, graph_name: str) -> int
      def get_input_shape(self, graph_name: str, index: int, stage: int = 0) -> list[int]
      def get_output_shape(self, graph_name: str, index: int, stage: int = 0) -> list[int]
      def get_input_dtype(self, graph_name: str, index: int) -> Dtype
      def get_output_dtype(self, graph_name: str, index: int) -> Dtype
      def get_input_tensors(self, graph_name: str, stage: int = 0) -> dict[int, Tensor]
          the graph's own input tensors; only in addr mode 1 (otherwise an error log and {})
      def process(self, graph_name: str, input: dict[int, Tensor], output: dict[int, Tensor],
                  core_list: list[int] = [0]) -> int
          runs the graph on the device memory of the given tensors, read as the graph's dtypes and
          with the given tensors' shapes (static graphs: exactly the compiled shapes)

Device memory is emulated byte for byte: tensors are buffers with shapes and dtypes, views write
into their source's memory, and a graph reads and writes exactly where its tensors point. In addr
mode 1 each graph owns persistent IO memory; in addr mode 0 there is none to get.
"""

from __future__ import annotations

import enum
import math
import os
import sys
from pathlib import Path

import numpy as np

from sophon._bmodel import Bmodel, GraphDef, TensorDef, load_bmodel

# How many TPUs the stand-in machine has (ids 0..n-1): lets tests load on several DEV_IDs.
TPU_NUM_ENV = "SAIL_STANDIN_TPU_NUM"


class Dtype(enum.Enum):
    BM_FLOAT32 = 0
    BM_FLOAT16 = 1
    BM_INT8 = 2
    BM_UINT8 = 3
    BM_INT16 = 4
    BM_UINT16 = 5
    BM_INT32 = 6
    BM_UINT32 = 7
    BM_BFLOAT16 = 8


class SailError(Exception):
    """What sail raises: SailTensorError, SailEngineError... in the real module, registered with
    pybind11 and so derived from Exception."""


_BY_NAME = {
    "float32": Dtype.BM_FLOAT32,
    "float16": Dtype.BM_FLOAT16,
    "bfloat16": Dtype.BM_BFLOAT16,
    "int32": Dtype.BM_INT32,
}
# numpy types of asnumpy()/update_data(): 16-bit floats travel as their raw bits.
_HOST = {
    Dtype.BM_FLOAT32: np.dtype("<f4"),
    Dtype.BM_FLOAT16: np.dtype("<u2"),
    Dtype.BM_BFLOAT16: np.dtype("<u2"),
    Dtype.BM_INT32: np.dtype("<i4"),
}


class Handle:
    def __init__(self, dev_id: int) -> None:
        available = int(os.environ.get(TPU_NUM_ENV, "1"))
        if not 0 <= dev_id < available:
            raise SailError(f"Invalid tpu id: {dev_id}! ({available} TPUs on this stand-in machine)")


class Tensor:
    def __init__(self, *args: object) -> None:
        """pybind11-style overloads, chosen by the first argument's type."""
        if args and isinstance(args[0], Handle):
            self._init_device(*args)
        elif args and isinstance(args[0], Tensor):
            self._init_view(*args)
        else:
            raise TypeError(
                "Tensor(): incompatible constructor arguments; the stand-in has Tensor(handle, shape, "
                "dtype, own_sys_data, own_dev_data) and Tensor(src, shape, offset, no_copy)"
            )

    def _init_device(
        self,
        handle: Handle,
        shape: list[int],
        dtype: Dtype = Dtype.BM_FLOAT32,
        own_sys_data: bool = False,
        own_dev_data: bool = False,
    ) -> None:
        if own_sys_data:
            raise NotImplementedError("the stand-in has device memory only (own_sys_data=False)")
        self._dtype, self._shape = _supported(dtype), _valid_shape(shape)
        self._start = 0
        # Fresh device memory is zeroed (bm_memset_device_ext in Tensor_CC's constructor).
        self._memory = np.zeros(self._nbytes(), dtype=np.uint8) if own_dev_data else None

    def _init_view(self, src: Tensor, shape: list[int], offset: int, no_copy: bool = True) -> None:
        if not no_copy:
            raise SailError("no_copy=False is not supported")
        if src._memory is None:
            raise SailError("The source Tensor has no device memory.")
        self._dtype, self._shape = src._dtype, _valid_shape(shape)
        itemsize = _HOST[self._dtype].itemsize
        if offset < 0 or offset * itemsize + self._nbytes() > src._nbytes():
            raise SailError(
                f"size out of range: a view of {self._shape} at element {offset} does not fit in {src._shape}"
            )
        self._memory, self._start = src._memory, src._start + offset * itemsize

    def shape(self) -> list[int]:
        return list(self._shape)

    def update_data(self, data: np.ndarray) -> None:
        if tuple(data.shape) != tuple(self._shape):
            raise SailError(f"Invalid tensor shape {self._shape} vs. {list(data.shape)}!")
        expected = _HOST[self._dtype]
        if data.dtype != expected:
            raise TypeError(
                f"update_data: a {self._dtype.name} tensor takes numpy {expected} data "
                f"(16-bit floats as raw bits: .view(np.uint16)), got {data.dtype}"
            )
        self._bytes(self._nbytes())[:] = np.ascontiguousarray(data).reshape(-1).view(np.uint8)

    def asnumpy(self, shape: list[int] = None) -> np.ndarray:  # noqa: RUF013 (the published stub)
        shape = self._shape if shape is None else _valid_shape(shape)
        values = self._bytes(self._nbytes()).view(_HOST[self._dtype])
        if math.prod(shape) > values.size:
            raise SailError(f"asnumpy: shape {shape} exceeds the tensor's {self._shape}")
        return values[: math.prod(shape)].reshape(shape).copy()

    # --- the device side, used by EngineLLM.process ---

    def _nbytes(self) -> int:
        return math.prod(self._shape) * _HOST[self._dtype].itemsize

    def _bytes(self, count: int) -> np.ndarray:
        if self._memory is None:
            raise SailError("Can not found device memory or host memory!")
        if self._start + count > self._memory.size:
            raise SailError(f"device access of {count} bytes runs past the end of the memory")
        return self._memory[self._start : self._start + count]


class EngineLLM:
    def __init__(self, bmodel_path: str, dev_ids: list[int]) -> None:
        if not dev_ids:
            raise SailError("EngineLLM device_ids error!")
        handles = [Handle(dev_id) for dev_id in dev_ids]
        if not Path(bmodel_path).is_file():
            raise SailError(f"bmodel {bmodel_path} does not exist")
        self._bmodel: Bmodel = load_bmodel(Path(bmodel_path))
        if len(handles) != 1:
            raise SailError(f"the stand-in's bmodels are compiled for 1 device, not {len(handles)}")
        self._handle = handles[0]
        self._own_inputs = {}
        if self._bmodel.addr_mode == 1:
            graphs = self._bmodel.graphs.items()
            self._own_inputs = {name: _allocate(self._handle, graph.inputs) for name, graph in graphs}

    def get_graph_names(self) -> list[str]:
        return list(self._bmodel.graphs)

    def get_addr_mode(self, graph_name: str) -> int:
        self._graph(graph_name)
        return self._bmodel.addr_mode

    def get_is_dynamic(self, graph_name: str) -> bool:
        return self._graph(graph_name).is_dynamic

    def get_input_num(self, graph_name: str) -> int:
        return len(self._graph(graph_name).inputs)

    def get_input_shape(self, graph_name: str, index: int, stage: int = 0) -> list[int]:
        return list(self._io(graph_name, "inputs", index, stage).shape)

    def get_output_shape(self, graph_name: str, index: int, stage: int = 0) -> list[int]:
        return list(self._io(graph_name, "outputs", index, stage).shape)

    def get_input_dtype(self, graph_name: str, index: int) -> Dtype:
        return _BY_NAME[self._io(graph_name, "inputs", index).dtype]

    def get_output_dtype(self, graph_name: str, index: int) -> Dtype:
        return _BY_NAME[self._io(graph_name, "outputs", index).dtype]

    def get_input_tensors(self, graph_name: str, stage: int = 0) -> dict[int, Tensor]:
        self._io(graph_name, "inputs", 0, stage)
        if graph_name not in self._own_inputs:
            print("Can not get internal input tensors when addr_mode is not 1.", file=sys.stderr)
            return {}
        return dict(enumerate(self._own_inputs[graph_name]))

    def process(
        self,
        graph_name: str,
        input: dict[int, Tensor],
        output: dict[int, Tensor],
        core_list: list[int] = [0],  # noqa: B006 (the published stub's default)
    ) -> int:
        graph = self._graph(graph_name)
        if graph.compute is None:
            raise NotImplementedError(f"the stand-in does not compute {graph_name}")
        arguments = [_read(graph_name, graph, spec, input, i) for i, spec in enumerate(graph.inputs)]
        results = graph.compute(arguments)
        for index, (spec, result) in enumerate(zip(graph.outputs, results, strict=True)):
            _write(graph_name, graph, spec, output, index, result)
        return 0

    def _graph(self, graph_name: str) -> GraphDef:
        if graph_name not in self._bmodel.graphs:
            raise SailError(f"no graph named {graph_name!r} in this bmodel")
        return self._bmodel.graphs[graph_name]

    def _io(self, graph_name: str, side: str, index: int, stage: int = 0) -> TensorDef:
        specs = getattr(self._graph(graph_name), side)
        if stage != 0 or not 0 <= index < len(specs):
            raise SailError(f"{graph_name}: no {side[:-1]} {index} in stage {stage}")
        return specs[index]


def _allocate(handle: Handle, specs: tuple[TensorDef, ...]) -> list[Tensor]:
    return [Tensor(handle, list(spec.shape), _BY_NAME[spec.dtype], False, True) for spec in specs]


def _supported(dtype: Dtype) -> Dtype:
    if dtype not in _HOST:
        raise NotImplementedError(f"the stand-in has no {dtype}")
    return dtype


def _valid_shape(shape: list[int]) -> list[int]:
    if not shape or any(dim <= 0 for dim in shape):
        raise SailError(f"invalid shape {shape}")
    return [int(dim) for dim in shape]


def _check_shape(graph_name: str, graph: GraphDef, spec: TensorDef, shape: list[int]) -> None:
    """Static graphs run at their compiled shapes; dynamic ones at any shape up to them."""
    if graph.is_dynamic:
        ok = len(shape) == len(spec.shape) and all(d <= m for d, m in zip(shape, spec.shape, strict=True))
    else:
        ok = tuple(shape) == spec.shape
    if not ok:
        kind = "dynamic, max" if graph.is_dynamic else "static"
        raise SailError(
            f"{graph_name}: {spec.name} has shape {shape}, the graph is {kind} {list(spec.shape)}"
        )


def _tensor(graph_name: str, tensors: dict[int, Tensor], index: int, count: int) -> Tensor:
    if set(tensors) != set(range(count)):
        raise SailError(f"{graph_name}: tensors for indexes {sorted(tensors)}, the graph has {count}")
    return tensors[index]


def _read(
    graph_name: str, graph: GraphDef, spec: TensorDef, tensors: dict[int, Tensor], index: int
) -> np.ndarray:
    """An input as the graph sees it: the tensor's memory read in the graph's dtype, as float32/int32."""
    tensor = _tensor(graph_name, tensors, index, len(graph.inputs))
    _check_shape(graph_name, graph, spec, tensor.shape())
    count = math.prod(tensor.shape())
    raw = tensor._bytes(count * _HOST[_BY_NAME[spec.dtype]].itemsize)
    return _decode(raw, spec.dtype).reshape(tensor.shape())


def _write(
    graph_name: str,
    graph: GraphDef,
    spec: TensorDef,
    tensors: dict[int, Tensor],
    index: int,
    value: np.ndarray,
) -> None:
    """An output stored where its tensor points, in the graph's dtype, at the computed shape."""
    tensor = _tensor(graph_name, tensors, index, len(graph.outputs))
    _check_shape(graph_name, graph, spec, tensor.shape())
    if value.size > math.prod(tensor.shape()):
        raise SailError(
            f"{graph_name}: output {spec.name} of shape {list(value.shape)} overflows {tensor.shape()}"
        )
    encoded = _encode(value, spec.dtype)
    tensor._bytes(encoded.size)[:] = encoded


def _decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return raw.view({"float32": "<f4", "float16": "<f2", "int32": "<i4"}[dtype]).astype(
        np.int32 if dtype == "int32" else np.float32
    )


def _encode(value: np.ndarray, dtype: str) -> np.ndarray:
    """Host values -> device bytes; bfloat16 rounds to nearest even, as the TPU's conversion does."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype("<u2").reshape(-1).view(np.uint8)
    numpy_type = {"float32": "<f4", "float16": "<f2", "int32": "<i4"}[dtype]
    return np.ascontiguousarray(value, dtype=numpy_type).reshape(-1).view(np.uint8)
