"""A stand-in for `sophon.sail` (tests only): the subset the sail adapter uses, computed on the CPU,
as strict as the real SDK where the real SDK is unforgiving.

Tests put tests/fake_sail on sys.path; product code never imports this. Bmodels are the JSON
descriptions of `sophon._bmodel`, computed with the numpy layer math.

Followed from sophgo/sophon-sail v3.10.7 (the bindings in src/bind.cpp, the behaviour in
src/tensor.cpp and src/engine_llm.cpp; pyis/*.pyi document them):
- `Tensor(handle, shape, dtype, own_sys_data=False, own_dev_data=False)`: dtype has no default in
  the binding. Fresh device memory is zeroed (Tensor_CC's constructor memsets it).
- `Tensor(src, shape, offset, no_copy=True)`: a view at an element offset, bound only from 3.9.1 on
  (absent from 3.9.0's bind.cpp): with SAIL_STANDIN_VERSION=3.9.0 the overload does not exist and
  the call is pybind11's TypeError. A view must fit inside src ("size out of range") and shares its
  host mirror, if any, at the same offset.
- In addr mode 1 ("io_alone", per graph: real bmodels set it on block_cache only) the runtime
  allocates the graph's IO memory and never clears it: here it starts as NaN bit patterns (0xFF).
- SoC mode (SAIL_STANDIN_SOC=1, an SE7 box): the runtime's own tensors are mmapped (reset_dev_data
  maps them), so they have a host mirror: `update_data` writes only the mirror, `asnumpy` reads only
  the mirror, `sync_s2d` / `sync_d2s` copy between the two, and `zeros` fills the device then
  invalidates the mirror. Graphs read and write device memory only. On PCIe nothing has a mirror.
- `EngineLLM.process` returns None and raises on failure; the errors are the registered classes
  SailDeviceError, SailTensorError, SailEngineError (no common base but Exception).
- Every tensor belongs to one device; a graph input or output given on another device is refused.
"""

from __future__ import annotations

import enum
import math
import os
import sys
from pathlib import Path

import numpy as np

from sophon._bmodel import Bmodel, DeviceInputsDiffer, GraphDef, TensorDef, load_bmodel

# How many TPUs the stand-in machine has (ids 0..n-1): lets tests load on several DEV_IDs.
TPU_NUM_ENV = "SAIL_STANDIN_TPU_NUM"
SOC_ENV = "SAIL_STANDIN_SOC"  # "1": an SoC box (SE7): runtime tensors have host mirrors
VERSION_ENV = "SAIL_STANDIN_VERSION"  # the sail release to behave as (default 3.10.7)
VIEW_SINCE = (3, 9, 1)  # the first release binding Tensor(src, shape, offset, no_copy)

__version__ = os.environ.get(VERSION_ENV, "3.10.7")
_HAS_VIEW = tuple(int(part) for part in __version__.split(".")[:3]) >= VIEW_SINCE
_UNCLEARED = 0xFF  # what io_alone memory holds before anything writes it: NaN in every float dtype


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


class SailDeviceError(Exception):
    pass


class SailTensorError(Exception):
    pass


class SailEngineError(Exception):
    pass


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


def get_available_tpu_num() -> int:
    return int(os.environ.get(TPU_NUM_ENV, "1"))


def _soc() -> bool:
    return os.environ.get(SOC_ENV) == "1"


class Handle:
    def __init__(self, dev_id: int) -> None:
        available = get_available_tpu_num()
        if not 0 <= dev_id < available:
            raise SailDeviceError(f"Invalid tpu id: {dev_id}! ({available} TPUs on this stand-in machine)")
        self._dev_id = dev_id


class Tensor:
    def __init__(self, *args: object) -> None:
        """pybind11-style overloads, chosen by the first argument's type."""
        if args and isinstance(args[0], Handle):
            self._init_device(*args)
        elif args and isinstance(args[0], Tensor) and _HAS_VIEW:
            self._init_view(*args)
        else:
            views = "Tensor(src, shape, offset, no_copy)" if _HAS_VIEW else "(no view overload before 3.9.1)"
            raise TypeError(
                "__init__(): incompatible constructor arguments. The following argument types are "
                f"supported: Tensor(handle, shape, dtype, own_sys_data, own_dev_data), {views}"
            )

    def _init_device(
        self,
        handle: Handle,
        shape: list[int],
        dtype: Dtype,
        own_sys_data: bool = False,
        own_dev_data: bool = False,
    ) -> None:
        if own_sys_data:
            raise NotImplementedError("the stand-in has device memory only (own_sys_data=False)")
        self._dtype, self._shape, self._device = _supported(dtype), _valid_shape(shape), handle._dev_id
        self._start = 0
        self._memory = np.zeros(self._nbytes(), dtype=np.uint8) if own_dev_data else None
        self._mirror: np.ndarray | None = None

    def _init_view(self, src: Tensor, shape: list[int], offset: int, no_copy: bool = True) -> None:
        if not no_copy:
            raise SailTensorError("no_copy=False is not supported")
        if src._memory is None:
            raise SailTensorError("invalid Tensor: the source Tensor has no device memory")
        self._dtype, self._shape, self._device = src._dtype, _valid_shape(shape), src._device
        itemsize = _HOST[self._dtype].itemsize
        if offset < 0 or offset * itemsize + self._nbytes() > src._nbytes():
            raise SailTensorError(
                f"size out of range: a view of {self._shape} at element {offset} does not fit in {src._shape}"
            )
        self._memory, self._mirror = src._memory, src._mirror
        self._start = src._start + offset * itemsize

    @classmethod
    def _runtime_owned(cls, handle: Handle, spec: TensorDef) -> Tensor:
        """IO memory the runtime allocated for an io_alone graph: uncleared; mmapped on SoC."""
        tensor = cls(handle, list(spec.shape), _BY_NAME[spec.dtype], False, True)
        tensor._memory[:] = _UNCLEARED
        if _soc():
            tensor._mirror = tensor._memory.copy()
        return tensor

    def shape(self) -> list[int]:
        return list(self._shape)

    def dtype(self) -> Dtype:
        return self._dtype

    def update_data(self, data: np.ndarray) -> None:
        if tuple(data.shape) != tuple(self._shape):
            raise SailTensorError(f"invalid argument: tensor shape {self._shape} vs. {list(data.shape)}")
        expected = _HOST[self._dtype]
        if data.dtype != expected:
            raise SailTensorError(
                f"Wrong dtype of input array: a {self._dtype.name} tensor takes numpy {expected} data "
                f"(16-bit floats as raw bits: .view(np.uint16)), got {data.dtype}"
            )
        self._host_side()[:] = np.ascontiguousarray(data).reshape(-1).view(np.uint8)

    def asnumpy(self, shape: list[int] = None) -> np.ndarray:  # noqa: RUF013 (the published stub)
        shape = self._shape if shape is None else _valid_shape(shape)
        values = self._host_side().view(_HOST[self._dtype])
        if math.prod(shape) > values.size:
            raise SailTensorError(f"asnumpy: shape {shape} exceeds the tensor's {self._shape}")
        return values[: math.prod(shape)].reshape(shape).copy()

    def zeros(self) -> None:
        """A device-side fill (bm_memset_device_ext); on SoC the mirror is invalidated after it."""
        self._device_bytes(self._nbytes())[:] = 0
        self.sync_d2s()

    def sync_s2d(self) -> None:
        if self._mirror is not None:
            self._device_bytes(self._nbytes())[:] = self._mirror_bytes()

    def sync_d2s(self) -> None:
        if self._mirror is not None:
            self._mirror_bytes()[:] = self._device_bytes(self._nbytes())

    # --- the device side, used by EngineLLM.process ---

    def _nbytes(self) -> int:
        return math.prod(self._shape) * _HOST[self._dtype].itemsize

    def _host_side(self) -> np.ndarray:
        """What update_data writes and asnumpy reads: the mirror when there is one."""
        return self._device_bytes(self._nbytes()) if self._mirror is None else self._mirror_bytes()

    def _mirror_bytes(self) -> np.ndarray:
        return self._mirror[self._start : self._start + self._nbytes()]

    def _device_bytes(self, count: int) -> np.ndarray:
        if self._memory is None:
            raise SailTensorError("invalid Tensor: can not found device memory or host memory")
        if self._start + count > self._memory.size:
            raise SailTensorError(f"device access of {count} bytes runs past the end of the memory")
        return self._memory[self._start : self._start + count]


class EngineLLM:
    def __init__(self, bmodel_path: str, dev_ids: list[int]) -> None:
        if not dev_ids:
            raise SailEngineError("EngineLLM device_ids error!")
        handles = [Handle(dev_id) for dev_id in dev_ids]
        if not Path(bmodel_path).is_file():
            raise SailEngineError(f"EngineLLM bmodel error! ({bmodel_path} does not exist)")
        self._bmodel: Bmodel = load_bmodel(Path(bmodel_path))
        if len(handles) != self._bmodel.num_device:
            # bmrt_load_bmodel fails; sail's message does not say why (src/engine_llm.cpp).
            raise SailEngineError("EngineLLM related error!")
        self._dev_ids = list(dev_ids)
        self._own: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        for name, graph in self._bmodel.graphs.items():
            if graph.addr_mode == 1:
                inputs = [Tensor._runtime_owned(handles[spec.device], spec) for spec in graph.inputs]
                outputs = [Tensor._runtime_owned(handles[spec.device], spec) for spec in graph.outputs]
                self._own[name] = (inputs, outputs)

    def get_device_ids(self) -> list[int]:
        return list(self._dev_ids)

    def get_graph_names(self) -> list[str]:
        return list(self._bmodel.graphs)

    def get_addr_mode(self, graph_name: str) -> int:
        return self._graph(graph_name).addr_mode

    def get_is_dynamic(self, graph_name: str) -> bool:
        return self._graph(graph_name).is_dynamic

    def get_input_num(self, graph_name: str) -> int:
        return len(self._graph(graph_name).inputs)

    def get_output_num(self, graph_name: str) -> int:
        return len(self._graph(graph_name).outputs)

    def get_input_shape(self, graph_name: str, index: int, stage: int = 0) -> list[int]:
        return list(self._io(graph_name, "inputs", index, stage).shape)

    def get_output_shape(self, graph_name: str, index: int, stage: int = 0) -> list[int]:
        return list(self._io(graph_name, "outputs", index, stage).shape)

    def get_input_dtype(self, graph_name: str, index: int) -> Dtype:
        return _BY_NAME[self._io(graph_name, "inputs", index).dtype]

    def get_output_dtype(self, graph_name: str, index: int) -> Dtype:
        return _BY_NAME[self._io(graph_name, "outputs", index).dtype]

    def get_input_tensors(self, graph_name: str, stage: int = 0) -> dict[int, Tensor]:
        return self._runtime_tensors(graph_name, stage, 0)

    def get_output_tensors(self, graph_name: str, stage: int = 0) -> dict[int, Tensor]:
        return self._runtime_tensors(graph_name, stage, 1)

    def process(
        self,
        graph_name: str,
        input: dict[int, Tensor],
        output: dict[int, Tensor],
        core_list: list[int] = [0],  # noqa: B006 (the published stub's default)
    ) -> None:
        graph = self._graph(graph_name)
        if graph.compute is None:
            raise NotImplementedError(f"the stand-in does not compute {graph_name}")
        arguments = [self._read(graph_name, graph, spec, input, i) for i, spec in enumerate(graph.inputs)]
        try:
            results = graph.compute(arguments)
        except DeviceInputsDiffer as error:
            raise SailEngineError(f"{graph_name}: {error}") from None
        for index, (spec, result) in enumerate(zip(graph.outputs, results, strict=True)):
            self._write(graph_name, graph, spec, output, index, result)

    def _runtime_tensors(self, graph_name: str, stage: int, side: int) -> dict[int, Tensor]:
        self._io(graph_name, "inputs", 0, stage)
        if graph_name not in self._own:
            print("Can not get internal input tensors when addr_mode is not 1.", file=sys.stderr)
            return {}
        return dict(enumerate(self._own[graph_name][side]))

    def _graph(self, graph_name: str) -> GraphDef:
        if graph_name not in self._bmodel.graphs:
            raise SailEngineError(f"Graph related error! no graph named {graph_name!r} in this bmodel")
        return self._bmodel.graphs[graph_name]

    def _io(self, graph_name: str, side: str, index: int, stage: int = 0) -> TensorDef:
        specs = getattr(self._graph(graph_name), side)
        if stage != 0 or not 0 <= index < len(specs):
            raise SailEngineError(f"{graph_name}: no {side[:-1]} {index} in stage {stage}")
        return specs[index]

    def _placed(self, graph_name: str, spec: TensorDef, tensors: dict[int, Tensor], index: int) -> Tensor:
        tensor = _tensor(graph_name, tensors, index, spec)
        if tensor._device != self._dev_ids[spec.device]:
            raise SailEngineError(
                f"{graph_name}: {spec.name} (index {index}) belongs on device {self._dev_ids[spec.device]}, "
                f"the tensor is on device {tensor._device}"
            )
        return tensor

    def _read(
        self, graph_name: str, graph: GraphDef, spec: TensorDef, tensors: dict[int, Tensor], index: int
    ) -> np.ndarray:
        """An input as the graph sees it: device memory read in the graph's dtype, as float32/int32."""
        if set(tensors) != set(range(len(graph.inputs))):
            raise SailEngineError(
                f"{graph_name}: inputs {sorted(tensors)}, the graph has {len(graph.inputs)}"
            )
        tensor = self._placed(graph_name, spec, tensors, index)
        _check_shape(graph_name, graph, spec, tensor.shape())
        count = math.prod(tensor.shape())
        raw = tensor._device_bytes(count * _HOST[_BY_NAME[spec.dtype]].itemsize)
        return _decode(raw, spec.dtype).reshape(tensor.shape())

    def _write(
        self,
        graph_name: str,
        graph: GraphDef,
        spec: TensorDef,
        tensors: dict[int, Tensor],
        index: int,
        value: np.ndarray,
    ) -> None:
        """An output stored in device memory where its tensor points, in the graph's dtype."""
        if set(tensors) != set(range(len(graph.outputs))):
            raise SailEngineError(
                f"{graph_name}: outputs {sorted(tensors)}, the graph has {len(graph.outputs)}"
            )
        tensor = self._placed(graph_name, spec, tensors, index)
        _check_shape(graph_name, graph, spec, tensor.shape())
        if value.size > math.prod(tensor.shape()):
            raise SailEngineError(
                f"{graph_name}: output {spec.name} of shape {list(value.shape)} overflows {tensor.shape()}"
            )
        encoded = _encode(value, spec.dtype)
        tensor._device_bytes(encoded.size)[:] = encoded


def _supported(dtype: Dtype) -> Dtype:
    if dtype not in _HOST:
        raise NotImplementedError(f"the stand-in has no {dtype}")
    return dtype


def _valid_shape(shape: list[int]) -> list[int]:
    if not shape or any(dim <= 0 for dim in shape):
        raise SailTensorError(f"invalid shape {shape}")
    return [int(dim) for dim in shape]


def _check_shape(graph_name: str, graph: GraphDef, spec: TensorDef, shape: list[int]) -> None:
    """Static graphs run at their compiled shapes; dynamic ones at any shape up to them."""
    if graph.is_dynamic:
        ok = len(shape) == len(spec.shape) and all(d <= m for d, m in zip(shape, spec.shape, strict=True))
    else:
        ok = tuple(shape) == spec.shape
    if not ok:
        kind = "dynamic, max" if graph.is_dynamic else "static"
        raise SailEngineError(
            f"{graph_name}: {spec.name} has shape {shape}, the graph is {kind} {list(spec.shape)}"
        )


def _tensor(graph_name: str, tensors: dict[int, Tensor], index: int, spec: TensorDef) -> Tensor:
    tensor = tensors[index]
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{graph_name}: {spec.name} must be a sail.Tensor, got {type(tensor).__name__}")
    return tensor


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
