"""What a bmodel's graphs look like, read from sophon-sail's EngineLLM and checked before any step.

A worker refuses at load, with the reason, a bmodel it cannot drive, instead of failing its first
request inside the runtime ("size out of range"). Checked across embedding, blocks, KV and head:
- lengths: the prefill graphs (embedding, block_i) share one length P; the KV cache (block_cache_i's
  history) holds S >= P rows. LLM-TPU's exports compile them apart (MAX_INPUT_LENGTH vs SEQLEN):
  prompts are then at most P tokens, answers run on to S;
- widths: the hidden size of every graph, the kv heads and head dim that block_i writes and
  block_cache_i reads, the masks [1, 1, P, P] and [1, 1, 1, S + 1];
- dtypes: activations, masks and KV of one floating dtype across the blocks; the embedding may
  differ (sophon-demo's gen_bmodel.sh compiles it BF16 whatever the blocks' mode) and so may
  lm_head's input: those hidden states are converted through the host;
- the head: logits (a float [1, V] row, or [1, 1, V]) or a token id (int32 [1], [1, 1], or top-k
  ids [1, K] best first, lm_head_with_topk); a `greedy_head` (export_onnx_qwen2.py GreedyHead:
  logits -> token) is used for greedy requests when it takes lm_head's logits as they are;
- devices: block_i has 3 inputs per device and block_cache_i 5 (sophon-demo python/qwen.py's
  index layout for `2dev` bmodels); the bmodel's device count must be the worker's group size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

EMBEDDING = "embedding"
EMBEDDING_CACHE = "embedding_cache"
LM_HEAD = "lm_head"
GREEDY_HEAD = "greedy_head"
_BLOCK_NAME = re.compile(r"block_\d+")
_BLOCK_INPUTS, _BLOCK_CACHE_INPUTS, _BLOCK_OUTPUTS = 3, 5, 3  # per device


class BmodelLayoutError(ValueError):
    """A bmodel this adapter cannot drive; the message says why."""


@dataclass(frozen=True)
class Layout:
    num_layers: int
    devices: int
    seq_len: int  # S: KV rows
    prefill_length: int  # P: the prefill graphs' length
    hidden_size: int
    kv_shape: tuple[int, int, int, int]  # [1, S, kv_heads, dim] per device
    is_dynamic: bool
    activation_dtype: Any
    embedding_dtype: Any
    head_dtype: Any  # lm_head's output
    head_input_shape: list[int]
    head_input_dtype: Any
    head_is_token: bool
    has_greedy_head: bool
    kv_in_runtime_memory: bool  # static, block_cache io_alone: the cache is the graphs' own inputs
    addr_modes: dict[str, int]

    @property
    def convert_embedding(self) -> bool:
        return self.embedding_dtype != self.activation_dtype

    @property
    def convert_head(self) -> bool:
        return self.head_input_dtype != self.activation_dtype


def graph_table(engine: Any) -> list[str]:
    """One line per graph: addr mode, dynamic flag, and each input's and output's shape and dtype."""
    lines = []
    for graph in engine.get_graph_names():
        sides = []
        for side, count, shape, dtype in (
            ("in", engine.get_input_num(graph), engine.get_input_shape, engine.get_input_dtype),
            ("out", engine.get_output_num(graph), engine.get_output_shape, engine.get_output_dtype),
        ):
            tensors = ", ".join(
                f"{list(shape(graph, index))} {_dtype_name(dtype(graph, index))}" for index in range(count)
            )
            sides.append(f"{side}: {tensors}")
        mode, dynamic = engine.get_addr_mode(graph), "dynamic" if engine.get_is_dynamic(graph) else "static"
        lines.append(f"{graph}: addr_mode {mode}, {dynamic}; {'; '.join(sides)}")
    return lines


def _dtype_name(dtype: Any) -> str:
    return str(getattr(dtype, "name", dtype)).removeprefix("BM_")


def read_layout(engine: Any, dtypes: Any, name: str, devices: int) -> Layout:
    """Everything the adapter relies on, checked; BmodelLayoutError says what does not fit."""
    return _Reader(engine, dtypes, name).read(devices)


class _Reader:
    def __init__(self, engine: Any, dtypes: Any, name: str) -> None:
        self._engine, self._dtypes, self._name = engine, dtypes, name
        self._floats = (dtypes.BM_FLOAT16, dtypes.BM_BFLOAT16, dtypes.BM_FLOAT32)

    def read(self, devices: int) -> Layout:
        engine = self._engine
        names = list(engine.get_graph_names())
        layers = self._layer_count(names)
        compiled = engine.get_input_num("block_0") // _BLOCK_INPUTS
        if engine.get_input_num("block_0") % _BLOCK_INPUTS or compiled < 1:
            self._refuse(f"block_0 has {engine.get_input_num('block_0')} inputs, not 3 per device")
        if compiled != devices:
            self._refuse(
                f"compiled for {compiled} device(s), the worker drives a group of {devices}: "
                f"configure a device group of {compiled} chips (workers.devices entries such as "
                f'"{",".join(str(i) for i in range(compiled))}")'
            )
        self._check_counts(layers, devices)
        prefill = self._shape(EMBEDDING, "input", 0)
        if len(prefill) != 2 or prefill[0] != 1:
            self._refuse(f"embedding takes input_ids {prefill}, expected [1, P]")
        length = prefill[1]
        hidden = self._shape(EMBEDDING, "output", 0)[-1]
        kv = self._shape("block_cache_0", "input", 3)
        if len(kv) != 4 or kv[0] != 1:
            self._refuse(f"block_cache_0's history_k is {kv}, expected [1, SEQLEN, kv_heads, dim]")
        seq_len = kv[1]
        act = self._dtype("block_0", "input", 0)
        self._check_shapes(layers, devices, length, seq_len, hidden, kv)
        self._check_dtypes(layers, devices, act)
        embedding_dtype = self._dtype(EMBEDDING, "output", 0)
        if (
            embedding_dtype not in self._floats
            or self._dtype(EMBEDDING_CACHE, "output", 0) != embedding_dtype
        ):
            self._refuse(
                f"embedding outputs {embedding_dtype} and embedding_cache "
                f"{self._dtype(EMBEDDING_CACHE, 'output', 0)}: expected one floating dtype"
            )
        head_input = self._shape(LM_HEAD, "input", 0)
        if math.prod(head_input) != hidden:
            self._refuse(f"lm_head takes {head_input}, expected one row of the hidden size {hidden}")
        head_input_dtype = self._dtype(LM_HEAD, "input", 0)
        if head_input_dtype not in self._floats:
            self._refuse(f"lm_head takes {head_input_dtype}, expected a floating dtype")
        head_dtype, head_is_token = self._head()
        dynamic = bool(engine.get_is_dynamic("block_0"))
        addr_modes = {graph: int(engine.get_addr_mode(graph)) for graph in names}
        cache_graphs = [f"block_cache_{i}" for i in range(layers)]
        io_alone = all(addr_modes[graph] == 1 for graph in cache_graphs)
        return Layout(
            num_layers=layers,
            devices=devices,
            seq_len=seq_len,
            prefill_length=length,
            hidden_size=hidden,
            kv_shape=tuple(kv),
            is_dynamic=dynamic,
            activation_dtype=act,
            embedding_dtype=embedding_dtype,
            head_dtype=head_dtype,
            head_input_shape=head_input,
            head_input_dtype=head_input_dtype,
            head_is_token=head_is_token,
            has_greedy_head=not head_is_token and self._greedy_head_fits(),
            # sophon-demo qwen.py allocates its own KV for dynamic bmodels even when io_alone.
            kv_in_runtime_memory=io_alone and not dynamic,
            addr_modes=addr_modes,
        )

    def _layer_count(self, names: list[str]) -> int:
        layers = sum(1 for graph in names if _BLOCK_NAME.fullmatch(graph))
        required = {EMBEDDING, EMBEDDING_CACHE, LM_HEAD}
        required |= {f"block_{i}" for i in range(layers)} | {f"block_cache_{i}" for i in range(layers)}
        missing = sorted(required - set(names))
        if layers == 0 or missing:
            self._refuse(f"not a Qwen/Llama bmodel: missing graphs {missing or ['block_0']}")
        return layers

    def _check_counts(self, layers: int, devices: int) -> None:
        expected = {EMBEDDING: (devices, devices), EMBEDDING_CACHE: (devices, devices), LM_HEAD: (1, 1)}
        for layer in range(layers):
            expected[f"block_{layer}"] = (_BLOCK_INPUTS * devices, _BLOCK_OUTPUTS * devices)
            expected[f"block_cache_{layer}"] = (_BLOCK_CACHE_INPUTS * devices, _BLOCK_OUTPUTS * devices)
        for graph, (inputs, outputs) in expected.items():
            got = (self._engine.get_input_num(graph), self._engine.get_output_num(graph))
            if got != (inputs, outputs):
                self._refuse(
                    f"{graph} has {got[0]} inputs and {got[1]} outputs, expected {inputs} and {outputs}"
                )

    def _check_shapes(
        self, layers: int, devices: int, length: int, seq_len: int, hidden: int, kv: list[int]
    ) -> None:
        if length > seq_len:
            self._refuse(f"the prefill graphs take {length} positions, more than the KV cache's {seq_len}")
        rows = [1, length, *kv[2:]]
        expected = {
            (EMBEDDING, "output", 0): [1, length, hidden],
            (EMBEDDING_CACHE, "input", 0): [1, 1],
            (EMBEDDING_CACHE, "output", 0): [1, 1, hidden],
        }
        for layer in range(layers):
            block, cache = f"block_{layer}", f"block_cache_{layer}"
            for device in range(devices):
                i, c, o = _BLOCK_INPUTS * device, _BLOCK_CACHE_INPUTS * device, _BLOCK_OUTPUTS * device
                expected.update(
                    {
                        (block, "input", i): [1, length, hidden],
                        (block, "input", i + 1): [1, length],
                        (block, "input", i + 2): [1, 1, length, length],
                        (block, "output", o): [1, length, hidden],
                        (block, "output", o + 1): rows,
                        (block, "output", o + 2): rows,
                        (cache, "input", c): [1, 1, hidden],
                        (cache, "input", c + 1): [1, 1],
                        (cache, "input", c + 2): [1, 1, 1, seq_len + 1],
                        (cache, "input", c + 3): kv,
                        (cache, "input", c + 4): kv,
                        (cache, "output", o): [1, 1, hidden],
                        (cache, "output", o + 1): [1, 1, *kv[2:]],
                        (cache, "output", o + 2): [1, 1, *kv[2:]],
                    }
                )
        for device in range(devices):
            expected[(EMBEDDING, "input", device)] = [1, length]
        for (graph, side, index), shape in expected.items():
            got = self._shape(graph, side, index)
            if got != shape:
                self._refuse(
                    f"{graph} {side} {index} is {got}, expected {shape} (embedding length {length}, "
                    f"KV length {seq_len}, hidden size {hidden})"
                )

    def _check_dtypes(self, layers: int, devices: int, act: Any) -> None:
        if act not in self._floats:
            self._refuse(f"block_0 takes hidden states as {act}, expected F16, BF16 or F32")
        int32 = self._dtypes.BM_INT32
        for layer in range(layers):
            block, cache = f"block_{layer}", f"block_cache_{layer}"
            for device in range(devices):
                i, c, o = _BLOCK_INPUTS * device, _BLOCK_CACHE_INPUTS * device, _BLOCK_OUTPUTS * device
                wanted = {
                    (block, "input", i): act,
                    (block, "input", i + 1): int32,
                    (block, "input", i + 2): act,
                    (cache, "input", c): act,
                    (cache, "input", c + 1): int32,
                    (cache, "input", c + 2): act,
                    (cache, "input", c + 3): act,
                    (cache, "input", c + 4): act,
                }
                for out in range(3):
                    wanted[(block, "output", o + out)] = act
                    wanted[(cache, "output", o + out)] = act
                for (graph, side, index), dtype in wanted.items():
                    got = self._dtype(graph, side, index)
                    if got != dtype:
                        self._refuse(
                            f"{graph} {side} {index} is {got}, but block_0's activations are {act}: "
                            "activations, masks and KV must share one dtype across the blocks"
                        )
        for graph in (EMBEDDING, EMBEDDING_CACHE):
            for device in range(devices):
                if self._dtype(graph, "input", device) != int32:
                    self._refuse(
                        f"{graph} takes {self._dtype(graph, 'input', device)} token ids, expected INT32"
                    )

    def _head(self) -> tuple[Any, bool]:
        dtype, shape = self._dtype(LM_HEAD, "output", 0), self._shape(LM_HEAD, "output", 0)
        if dtype == self._dtypes.BM_INT32:
            if math.prod(shape[:-1]) != 1:
                self._refuse(f"lm_head returns token ids {shape}, expected [1], [1, 1] or top-k [1, K]")
            return dtype, True
        if dtype not in self._floats or math.prod(shape) != shape[-1]:
            self._refuse(f"lm_head returns {dtype} {shape}, expected logits [1, V] or token ids")
        return dtype, False

    def _greedy_head_fits(self) -> bool:
        engine = self._engine
        if GREEDY_HEAD not in engine.get_graph_names():
            return False
        takes = (self._shape(GREEDY_HEAD, "input", 0), self._dtype(GREEDY_HEAD, "input", 0))
        gives = (self._shape(LM_HEAD, "output", 0), self._dtype(LM_HEAD, "output", 0))
        token = self._dtype(GREEDY_HEAD, "output", 0) == self._dtypes.BM_INT32
        return (
            engine.get_input_num(GREEDY_HEAD) == 1
            and token
            and list(takes[0]) == list(gives[0])
            and takes[1] == gives[1]
        )

    def _shape(self, graph: str, side: str, index: int) -> list[int]:
        if side == "input":
            return list(self._engine.get_input_shape(graph, index))
        return list(self._engine.get_output_shape(graph, index))

    def _dtype(self, graph: str, side: str, index: int) -> Any:
        if side == "input":
            return self._engine.get_input_dtype(graph, index)
        return self._engine.get_output_dtype(graph, index)

    def _refuse(self, reason: str) -> None:
        raise BmodelLayoutError(f"{self._name}: cannot drive this bmodel: {reason}")
