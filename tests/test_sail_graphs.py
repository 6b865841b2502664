"""The sail adapter (worker/core/sail_graphs.py) through the sophon.sail stand-in (tests/fake_sail).

The stand-in emulates device memory byte for byte and computes each graph with the numpy layer
math, storing activations, k/v and masks in the compiled dtype (F16 or BF16). So the adapter's
tensor plumbing (views at element offsets, per-graph IO, dtype conversions, addr modes) must be
right for its tokens to equal the numpy backend's; its calls are checked against the signatures
published in sophon-sail's type stubs.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from common.config import GenerationDefaults
from tests.sail_standin import drop_sophon_modules
from tests.tiny_models import random_tensors, tiny_config, write_hf_checkpoint
from worker.core.checkpoint import Weights, load_hf_checkpoint
from worker.core.driver import Generation, prefill_mask
from worker.core.graphs import MASK_VALUE, HeadKind, ModelGraphs
from worker.core.llm_engine import LLMEngine
from worker.core.numpy_graphs import NumpyGraphs
from worker.core.request import USER, ChatRequest, EngineError, RequestError, SamplingParams, Turn
from worker.core.sail_graphs import SAIL_MISSING, SailGraphs, SailLoadError, SailNotInstalledError

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 64
VOCAB = 151936  # Qwen2's embedding rows: the real vocabulary's ids all fit
EOS = {151643, 151645}
# "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" in Qwen2.5 ids.
PROMPT = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
NEW_TOKENS = 24
GREEDY_DEFAULTS = GenerationDefaults(max_new_tokens=NEW_TOKENS, temperature=0.0, repetition_penalty=1.0)
# Largest logit difference to the float32 numpy backend that rounding the graphs' IO allows
# (logits here are about +-5; measured 0.011 for F16 blocks beside the BF16 embedding that
# gen_bmodel.sh compiles, and 0.016 for BF16).
LOGIT_TOLERANCE = {"float16": 0.025, "bfloat16": 0.05}

# The published signatures (sophgo/sophon-sail pyis/_basic.pyi, pyis/_engine_llm.pyi) of everything
# the adapter may call; several entries are pybind11 overloads. Where the stub and the binding
# (src/bind.cpp) disagree, the binding wins: Tensor's dtype has no default there.
PUBLISHED_STUBS = {
    "Handle.__init__": ["(self, dev_id: int)"],
    "Tensor.__init__": [
        "(self, handle: Handle, shape: list[int], dtype: Dtype,"
        " own_sys_data: bool = False, own_dev_data: bool = False)",
        "(self, handle: Handle, data: numpy.ndarray, own_sys_data: bool = True, own_dev_data: bool = True)",
        "(self, other: Tensor, ranges: list[tuple[int, int]], d2d_flag=True)",
        "(self, src: Tensor, shape: list[int], offset: int, no_copy: bool = True)",
    ],
    "Tensor.shape": ["(self) -> list[int]"],
    "Tensor.dtype": ["(self) -> Dtype"],
    "Tensor.zeros": ["(self) -> None"],
    "Tensor.sync_s2d": ["(self) -> None"],
    "Tensor.sync_d2s": ["(self) -> None"],
    "Tensor.update_data": ["(self, data: numpy.ndarray) -> None"],
    "Tensor.asnumpy": ["(self, shape: list[int] = None) -> numpy.ndarray"],
    "EngineLLM.__init__": [
        "(self, bmodel_path: str, dev_ids: list[int])",
        "(self, bmodel_bytes: bytes, bmodel_size: int, dev_ids: list[int])",
    ],
    "EngineLLM.get_graph_names": ["(self) -> list[str]"],
    "EngineLLM.get_addr_mode": ["(self, graph_name: str) -> int"],
    "EngineLLM.get_is_dynamic": ["(self, graph_name: str) -> bool"],
    "EngineLLM.get_input_num": ["(self, graph_name: str) -> int"],
    "EngineLLM.get_output_num": ["(self, graph_name: str) -> int"],
    "EngineLLM.get_device_ids": ["(self) -> list[int]"],
    "EngineLLM.get_input_shape": ["(self, graph_name: str, index: int, stage: int = 0) -> list[int]"],
    "EngineLLM.get_output_shape": ["(self, graph_name: str, index: int, stage: int = 0) -> list[int]"],
    "EngineLLM.get_input_dtype": ["(self, graph_name: str, index: int) -> Dtype"],
    "EngineLLM.get_output_dtype": ["(self, graph_name: str, index: int) -> Dtype"],
    "EngineLLM.get_input_tensors": [
        "(self, graph_name: str, tensor_name: str, stage: int = 0) -> dict[int, Tensor]",
        "(self, graph_name: str, stage: int = 0) -> dict[int, Tensor]",
    ],
    "EngineLLM.get_output_tensors": [
        "(self, graph_name: str, tensor_name: str, stage: int = 0) -> dict[int, Tensor]",
        "(self, graph_name: str, stage: int = 0) -> dict[int, Tensor]",
    ],
    "EngineLLM.process": [
        "(self, graph_name: str, input: dict[int, Tensor], output: dict[int, Tensor],"
        " core_list: list[int] = [0]) -> None"
    ],
}
PUBLISHED_DTYPES = {
    "BM_FLOAT32": 0,
    "BM_FLOAT16": 1,
    "BM_INT8": 2,
    "BM_UINT8": 3,
    "BM_INT16": 4,
    "BM_UINT16": 5,
    "BM_INT32": 6,
    "BM_UINT32": 7,
    "BM_BFLOAT16": 8,
}
PUBLISHED_MODULE_NAMES = {"Dtype", "Handle", "Tensor", "EngineLLM"}  # the names used of the module itself


@pytest.fixture
def write_bmodel(sail, tmp_path: Path, checkpoint: Path) -> Callable[..., Path]:
    """Writes a stand-in bmodel of a checkpoint (the tiny Qwen2 over the real vocabulary size unless
    `model` names another) with the given compile options."""
    from sophon._bmodel import write_bmodel

    def write(model: Path = checkpoint, **options: object) -> Path:
        return write_bmodel(tmp_path / "tiny.bmodel", model, seq_len=SEQ_LEN, **options)

    return write


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 (with q/k/v biases) over the real Qwen2 vocabulary size."""
    config = tiny_config(vocab_size=VOCAB, max_positions=SEQ_LEN)
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("tiny-qwen2"), config, random_tensors(config, 0, bias=True)
    )


@pytest.fixture(scope="module")
def weights(checkpoint: Path) -> Weights:
    return load_hf_checkpoint(checkpoint)


def greedy(graphs: ModelGraphs) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens through the generation driver until the context is full (the last KV rows
    used too), and the head output of every step."""
    heads: list[np.ndarray] = []

    def pick(logits: np.ndarray, tokens: object) -> int:
        heads.append(logits.copy())
        return int(np.argmax(logits))

    tokens = list(Generation(graphs, PROMPT, pick, SEQ_LEN, EOS, threading.Event()))
    return tokens, heads


@pytest.mark.parametrize("addr_mode", [0, 1])
@pytest.mark.parametrize("io_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_greedy_generation_matches_the_numpy_backend(write_bmodel, weights, dynamic, io_dtype, addr_mode):
    graphs = SailGraphs(write_bmodel(dynamic=dynamic, io_dtype=io_dtype, addr_mode=addr_mode))
    assert (graphs.spec.seq_len, graphs.spec.num_layers) == (SEQ_LEN, weights.arch.num_layers)
    assert (graphs.spec.is_dynamic, graphs.spec.head) == (dynamic, HeadKind.LOGITS)

    expected_tokens, expected_logits = greedy(NumpyGraphs(weights, SEQ_LEN, is_dynamic=dynamic))
    tokens, logits = greedy(graphs)

    assert len(expected_tokens) == SEQ_LEN - len(PROMPT)
    assert len(set(expected_tokens)) > len(expected_tokens) // 2  # varied: positions and KV matter
    assert tokens == expected_tokens
    for step, (got, expected) in enumerate(zip(logits, expected_logits, strict=True)):
        assert np.abs(got - expected).max() < LOGIT_TOLERANCE[io_dtype], f"step {step}"


@pytest.mark.parametrize("addr_mode", [0, 1])
def test_token_id_head_decodes_greedily(write_bmodel, weights, addr_mode):
    graphs = SailGraphs(write_bmodel(lm_head="token_id", addr_mode=addr_mode, sampling_heads=True))
    assert graphs.spec.head is HeadKind.TOKEN_ID

    tokens, heads = greedy(graphs)

    assert tokens == greedy(NumpyGraphs(weights, SEQ_LEN, is_dynamic=False))[0]
    assert heads == []  # no logits reach the host: the driver takes the bmodel's token


def test_prefill_rows_are_read_in_place(write_bmodel, weights):
    """lm_head reads any row of the prefill hidden states through a view at that row's offset."""
    graphs, reference = SailGraphs(write_bmodel(dynamic=True)), NumpyGraphs(weights, SEQ_LEN)
    ids = np.array([PROMPT], dtype=np.int32)
    positions, mask = np.arange(len(PROMPT), dtype=np.int32)[None], prefill_mask(len(PROMPT), len(PROMPT))
    hidden, expected = graphs.embedding(ids), reference.embedding(ids)
    for layer in range(graphs.spec.num_layers):
        hidden = graphs.block(layer, hidden, positions, mask)
        expected = reference.block(layer, expected, positions, mask)
    for row in (0, 5, len(PROMPT) - 1):
        difference = np.abs(graphs.lm_head(hidden, row) - reference.lm_head(expected, row)).max()
        assert difference < LOGIT_TOLERANCE["float16"], row


# The additive mask value (-10000) as the graphs' 16-bit inputs hold it.
MASK_BITS = {"float16": int(np.float16(MASK_VALUE).view(np.uint16)), "bfloat16": 50716}


@pytest.mark.parametrize("io_dtype", ["float16", "bfloat16"])
def test_masks_arrive_as_the_compiled_dtypes_bits(write_bmodel, sail, monkeypatch, io_dtype):
    """A wrong 16-bit pattern would still mask (any huge negative does), so look at the bits."""
    seen: dict[str, set[int]] = {}
    process = sail.EngineLLM.process

    def spy(self, graph_name, inputs, outputs, *rest):
        if graph_name in ("block_0", "block_cache_0"):
            seen.setdefault(graph_name, set()).update(np.unique(inputs[2].asnumpy()).tolist())
        return process(self, graph_name, inputs, outputs, *rest)

    monkeypatch.setattr(sail.EngineLLM, "process", spy)
    greedy(SailGraphs(write_bmodel(io_dtype=io_dtype)))
    assert seen == {"block_0": {0, MASK_BITS[io_dtype]}, "block_cache_0": {0, MASK_BITS[io_dtype]}}


@pytest.fixture
def chat_engines(
    write_bmodel, tiny_chat_model, tiny_chat_tokenizer
) -> Callable[..., tuple[LLMEngine, LLMEngine]]:
    """The tests' tiny chat model through the sail adapter and through the numpy backend."""

    def engines(**options: object) -> tuple[LLMEngine, LLMEngine]:
        # Plain greedy for both: a greedy-only bmodel takes no repetition penalty either.
        sail_graphs = SailGraphs(write_bmodel(tiny_chat_model, **options))
        numpy_graphs = NumpyGraphs(load_hf_checkpoint(tiny_chat_model), SEQ_LEN, is_dynamic=False)
        sail_engine = LLMEngine(sail_graphs, tiny_chat_tokenizer, "tiny", GREEDY_DEFAULTS)
        return sail_engine, LLMEngine(numpy_graphs, tiny_chat_tokenizer, "tiny", GREEDY_DEFAULTS)

    return engines


def answer(engine: LLMEngine, params: SamplingParams) -> str:
    request = ChatRequest("You are a helpful assistant.", (Turn(USER, "你好，请介绍一下你自己"),), params)
    return "".join(chunk.text for chunk in engine.generate(request, threading.Event()))


@pytest.mark.parametrize("lm_head", ["logits", "token_id"])
def test_chat_answers_match_the_numpy_backend(chat_engines, lm_head):
    sail_engine, numpy_engine = chat_engines(lm_head=lm_head, io_dtype="bfloat16", addr_mode=1)
    assert sail_engine.context_size == SEQ_LEN
    greedy_params = SamplingParams(temperature=0.0)
    assert answer(sail_engine, greedy_params) == answer(numpy_engine, greedy_params) != ""


def test_sampling_is_refused_when_greedy_is_compiled_in(chat_engines):
    sail_engine, _ = chat_engines(lm_head="token_id")
    with pytest.raises(RequestError, match="greedy decoding compiled into its bmodel"):
        answer(sail_engine, SamplingParams(temperature=0.8, seed=1))
    assert answer(sail_engine, SamplingParams(temperature=0.0)) != ""  # and greedy still works after


def test_static_prefill_must_span_seq_len(write_bmodel):
    graphs = SailGraphs(write_bmodel(dynamic=False))
    with pytest.raises(ValueError, match="static: prefill runs at 64 positions"):
        graphs.embedding(np.array([PROMPT], dtype=np.int32))


def test_a_bmodel_without_the_contract_graphs_is_refused(write_bmodel, sail, monkeypatch):
    names = sail.EngineLLM.get_graph_names
    monkeypatch.setattr(
        sail.EngineLLM, "get_graph_names", lambda self: [n for n in names(self) if n != "block_cache_1"]
    )
    with pytest.raises(ValueError, match=r"missing graphs \['block_cache_1'\]"):
        SailGraphs(write_bmodel())


def test_a_failing_graph_is_an_engine_error(write_bmodel, sail, monkeypatch):
    graphs = SailGraphs(write_bmodel(dynamic=True))

    def fail(self, graph_name, *args):
        raise sail.SailEngineError("Engine related error!")

    monkeypatch.setattr(sail.EngineLLM, "process", fail)
    with pytest.raises(
        EngineError,
        match=r"tiny\.bmodel on device 0: graph embedding failed: SailEngineError: Engine related error",
    ):
        graphs.embedding(np.array([PROMPT], dtype=np.int32))


GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
def device_engines(sail, monkeypatch) -> list:
    """Every stand-in EngineLLM created from now on, to look at device memory through the sail API."""
    created = []
    construct = sail.EngineLLM.__init__

    def remembered(self, *args: object) -> None:
        construct(self, *args)
        created.append(self)

    monkeypatch.setattr(sail.EngineLLM, "__init__", remembered)
    return created


def greedy_chat_engine(bmodel: Path, tokenizer) -> LLMEngine:
    return LLMEngine(SailGraphs(bmodel), tokenizer, "tiny", GREEDY_DEFAULTS)


def test_a_failed_generation_leaves_zeroed_kv_buffers_and_a_fresh_next_answer(
    write_bmodel, sail, monkeypatch, device_engines, tiny_chat_model, tiny_chat_tokenizer
):
    # addr_mode 1: the KV cache is block_cache_i's own inputs.
    bmodel = write_bmodel(tiny_chat_model, addr_mode=1, io_dtype="bfloat16")
    engine = greedy_chat_engine(bmodel, tiny_chat_tokenizer)
    fresh_answer = answer(greedy_chat_engine(bmodel, tiny_chat_tokenizer), GREEDY)
    device = device_engines[0]
    decode_steps: list[str] = []
    process = sail.EngineLLM.process

    def fail_in_the_fifth_decode_step(self, graph_name, *args):
        if self is device and graph_name.startswith("block_cache_"):
            decode_steps.append(graph_name)
            if len(decode_steps) == 9:  # layer 0 of the 5th step (2 layers)
                raise sail.SailEngineError("injected device fault")
        return process(self, graph_name, *args)

    monkeypatch.setattr(sail.EngineLLM, "process", fail_in_the_fifth_decode_step)
    request = ChatRequest("You are a helpful assistant.", (Turn(USER, "你好，请介绍一下你自己"),), GREEDY)
    streamed = []
    failure = "graph block_cache_0 failed: SailEngineError: injected device fault"
    with pytest.raises(EngineError, match=failure):
        for chunk in engine.generate(request, threading.Event()):
            streamed.append(chunk)

    assert streamed  # the failure came mid-generation
    for layer in range(2):
        kv = device.get_input_tensors(f"block_cache_{layer}")
        assert not kv[3].asnumpy().any() and not kv[4].asnumpy().any(), layer
    assert answer(engine, GREEDY) == fresh_answer != ""


def test_a_host_input_a_failure_left_half_written_is_written_again(
    write_bmodel, sail, monkeypatch, tiny_chat_model, tiny_chat_tokenizer
):
    """The adapter skips copying a mask equal to the last one it wrote; after a copy failed half-way
    the device holds neither, so reset must make the next request write it again."""
    bmodel = write_bmodel(tiny_chat_model, dynamic=False)  # every prefill mask is [1, 1, SEQ_LEN, SEQ_LEN]
    engine = greedy_chat_engine(bmodel, tiny_chat_tokenizer)
    first_answer = answer(engine, GREEDY)  # leaves this prompt's mask on the device
    copy = sail.Tensor.update_data

    def half_copied(self, data):
        if data.shape == (1, 1, SEQ_LEN, SEQ_LEN):
            copy(self, np.zeros_like(data))  # what a transfer cut short might leave: nothing masked
            raise sail.SailTensorError("injected fault while copying to the device")
        copy(self, data)

    monkeypatch.setattr(sail.Tensor, "update_data", half_copied)
    other = ChatRequest("", (Turn(USER, "Hi"),), GREEDY)  # another length: another mask
    with pytest.raises(EngineError, match="injected fault while copying"):
        list(engine.generate(other, threading.Event()))
    monkeypatch.setattr(sail.Tensor, "update_data", copy)

    assert answer(engine, GREEDY) == first_answer


def test_without_sophon_sail_the_error_says_what_is_missing(tmp_path, monkeypatch):
    if importlib.util.find_spec("sophon") is not None:
        pytest.skip("sophon-sail is installed here")
    drop_sophon_modules()
    bmodel = tmp_path / "model.bmodel"
    bmodel.write_bytes(b"")
    with pytest.raises(SailNotInstalledError) as error:
        SailGraphs(bmodel)
    assert str(error.value).startswith(SAIL_MISSING)
    assert "sophon-sail is not installed" in SAIL_MISSING


# --- the stand-in follows the published API, and the adapter only calls that API ---------------------


def stub_signatures(name: str, dtype: type) -> list[inspect.Signature]:
    signatures = []
    for text in PUBLISHED_STUBS[name]:
        namespace: dict = {"Dtype": dtype}  # stub defaults such as Dtype.BM_FLOAT32
        exec(f"from __future__ import annotations\ndef stub{text}: ...", namespace)
        signatures.append(inspect.signature(namespace["stub"]))
    return signatures


def call_shape(signature: inspect.Signature) -> list[tuple[str, object, object]]:
    """What a call depends on: parameter names, kinds and defaults (annotations are documentation)."""
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def standin_functions(sail) -> dict[str, list[Callable]]:
    """Every public function of the stand-in's classes; Tensor's constructor is its two overloads."""
    functions: dict[str, list[Callable]] = {}
    for cls in (sail.Handle, sail.Tensor, sail.EngineLLM):
        for name, value in vars(cls).items():
            if callable(value) and (name == "__init__" or not name.startswith("_")):
                functions[f"{cls.__name__}.{name}"] = [value]
    functions["Tensor.__init__"] = [sail.Tensor._init_device, sail.Tensor._init_view]
    return functions


def test_standin_signatures_are_the_published_ones(sail):
    assert {member.name: member.value for member in sail.Dtype} == PUBLISHED_DTYPES
    for name, implementations in standin_functions(sail).items():
        assert name in PUBLISHED_STUBS, f"the stand-in has {name}, which sophon-sail does not publish"
        published = [call_shape(signature) for signature in stub_signatures(name, sail.Dtype)]
        for implementation in implementations:
            assert call_shape(inspect.signature(implementation)) in published, name


def test_every_sail_call_of_the_adapter_is_published(sail, write_bmodel, monkeypatch):
    calls: list[tuple[str, tuple, dict]] = []
    for name, (implementation, *_) in standin_functions(sail).items():
        if name == "Tensor.__init__":
            implementation = sail.Tensor.__init__
        class_name, method = name.split(".")

        def recorded(
            *args: object, _name: str = name, _call: Callable = implementation, **kwargs: object
        ) -> object:
            calls.append((_name, args, kwargs))
            return _call(*args, **kwargs)

        monkeypatch.setattr(getattr(sail, class_name), method, recorded)

    for options in ({"addr_mode": 0, "dynamic": True}, {"addr_mode": 1, "lm_head": "token_id"}):
        graphs = SailGraphs(write_bmodel(**options))
        greedy(graphs)
        graphs.reset()

    assert {name for name, _, _ in calls} >= {
        "EngineLLM.process",
        "Tensor.update_data",
        "EngineLLM.get_input_tensors",
    }
    for name, args, kwargs in calls:
        assert not kwargs, (
            f"{name} called with keywords {kwargs}: pybind11 bindings take arguments by position"
        )
        signatures = stub_signatures(name, sail.Dtype)
        assert any(_binds(signature, args) for signature in signatures), (
            f"{name}{args[1:]} fits no published form"
        )


def _binds(signature: inspect.Signature, args: tuple) -> bool:
    try:
        signature.bind(*args)
    except TypeError:
        return False
    return True


def test_the_adapter_uses_only_published_module_names(sail):
    """sophon.sail attributes and Dtype members named in the adapter's source."""
    tree = ast.parse((REPO / "worker" / "core" / "sail_graphs.py").read_text())
    module_names, dtype_names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            if node.value.attr == "_sail":
                module_names.add(node.attr)
            if node.value.attr == "Dtype":
                dtype_names.add(node.attr)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sail":
            module_names.add(node.attr)
    assert module_names and module_names <= PUBLISHED_MODULE_NAMES
    assert dtype_names and dtype_names <= set(PUBLISHED_DTYPES)


# --- the stand-in really emulates device memory -----------------------------------------------------


def test_views_write_into_their_source_at_element_offsets(sail):
    handle = sail.Handle(0)
    parent = sail.Tensor(handle, [2, 3, 4], sail.Dtype.BM_INT32, False, True)
    row = sail.Tensor(parent, [1, 4], 5)
    row.update_data(np.array([[1, 2, 3, 4]], dtype=np.int32))
    inner = sail.Tensor(row, [2], 1)  # a view of a view
    inner.update_data(np.array([7, 8], dtype=np.int32))

    flat = parent.asnumpy().reshape(-1)
    assert flat[5:9].tolist() == [1, 7, 8, 4]
    assert np.count_nonzero(flat) == 4
    with pytest.raises(sail.SailTensorError, match="size out of range"):
        sail.Tensor(parent, [1, 4], 21)


def test_16_bit_tensors_take_raw_bits_of_the_exact_shape(sail):
    mask = sail.Tensor(sail.Handle(0), [1, 4], sail.Dtype.BM_FLOAT16, False, True)
    with pytest.raises(sail.SailTensorError, match="view"):
        mask.update_data(np.zeros((1, 4), dtype=np.float16))
    with pytest.raises(sail.SailTensorError, match="shape"):
        mask.update_data(np.zeros(4, dtype=np.uint16))
    values = np.array([[0, -10000, 1.5, -2]], dtype=np.float16)
    mask.update_data(values.view(np.uint16))
    assert mask.asnumpy().view(np.float16).tolist() == values.tolist()


def test_graph_memory_follows_the_addr_mode(sail, write_bmodel):
    own = sail.EngineLLM(str(write_bmodel(addr_mode=1)), [0]).get_input_tensors("block_cache_1")
    assert [tensor.shape() for tensor in own.values()][3:] == [[1, SEQ_LEN, 2, 8]] * 2
    shared = sail.EngineLLM(str(write_bmodel(addr_mode=0)), [0])
    assert shared.get_input_tensors("block_cache_1") == {}


def test_a_device_the_machine_lacks_is_refused(sail, write_bmodel):
    with pytest.raises(SailLoadError, match="SailDeviceError: Invalid tpu id: 1"):
        SailGraphs(write_bmodel(), 1)
