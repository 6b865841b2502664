"""The six risks a review of the sail adapter found against sophon-sail's real behaviour, one or more
tests each, through the strict stand-in (tests/fake_sail): uncleared io_alone memory, SoC host
mirrors, an SDK without the view constructor, prefill and KV lengths compiled apart, a BF16
embedding beside F16 blocks, and host work per layer / logits copied for greedy requests.
Each of these failed on the adapter before the fix (worker/core/sail_graphs.py at main 0ad59cc).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.test_sail_graphs import GREEDY_DEFAULTS, PROMPT, SEQ_LEN, VOCAB, greedy
from tests.tiny_models import random_tensors, tiny_config, write_hf_checkpoint
from worker.core.checkpoint import Weights, load_hf_checkpoint
from worker.core.driver import prefill_mask
from worker.core.llm_engine import LLMEngine
from worker.core.numpy_graphs import NumpyGraphs
from worker.core.request import USER, ChatRequest, EngineError, RequestError, SamplingParams, Turn
from worker.core.sail_graphs import SailGraphs, SailLoadError, SailTooOldError
from worker.core.sail_layout import BmodelLayoutError

GREEDY = SamplingParams(temperature=0.0)
QUESTION = ChatRequest("You are a helpful assistant.", (Turn(USER, "你好，请介绍一下你自己"),), GREEDY)


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 (with q/k/v biases) over the real Qwen2 vocabulary size."""
    config = tiny_config(vocab_size=VOCAB, max_positions=SEQ_LEN)
    return write_hf_checkpoint(tmp_path_factory.mktemp("qwen2"), config, random_tensors(config, 0, bias=True))


@pytest.fixture(scope="module")
def qwen(qwen_checkpoint: Path) -> Weights:
    return load_hf_checkpoint(qwen_checkpoint)


@pytest.fixture
def bmodel(standin, tmp_path: Path, qwen_checkpoint: Path) -> Callable[..., Path]:
    def write(model: Path = qwen_checkpoint, **options: object) -> Path:
        from sophon._bmodel import write_bmodel

        return write_bmodel(tmp_path / "tiny.bmodel", model, seq_len=SEQ_LEN, **options)

    return write


def device_engines(sail: object, monkeypatch: pytest.MonkeyPatch) -> list:
    created = []
    construct = sail.EngineLLM.__init__

    def remembered(self, *args: object) -> None:
        construct(self, *args)
        created.append(self)

    monkeypatch.setattr(sail.EngineLLM, "__init__", remembered)
    return created


def kv_on_device(engine: object, layers: int) -> list[np.ndarray]:
    """The runtime-owned KV inputs of every block_cache as the device holds them (SDK calls only)."""
    arrays = []
    for layer in range(layers):
        own = engine.get_input_tensors(f"block_cache_{layer}")
        for tensor in (own[3], own[4]):
            tensor.sync_d2s()
            arrays.append(tensor.asnumpy())
    return arrays


def chat_answer(engine: LLMEngine, request: ChatRequest = QUESTION) -> str:
    return "".join(chunk.text for chunk in engine.generate(request, threading.Event()))


# --- risk 1: io_alone memory is not cleared by the runtime ------------------------------------------


@pytest.mark.parametrize("soc", [False, True], ids=["pcie", "soc"])
def test_risk1_dynamic_bmodel_with_io_alone_block_cache_reads_no_uncleared_rows(
    standin,
    bmodel,
    qwen,
    soc,
):
    """The rows past a dynamic prefill are read (masked) before anything writes them; the runtime
    left NaN there, which survives the mask."""
    standin(soc=soc)
    graphs = SailGraphs(bmodel(dynamic=True, addr_mode=1, io_dtype="bfloat16"))
    expected_tokens, _ = greedy(NumpyGraphs(qwen, SEQ_LEN, is_dynamic=True))
    tokens, logits = greedy(graphs)
    assert all(np.isfinite(row).all() for row in logits)
    assert tokens == expected_tokens


# --- risk 2: on SoC, update_data writes the host mirror only ------------------------------------------


@pytest.mark.parametrize("soc", [False, True], ids=["pcie", "soc"])
def test_risk2_reset_zeroes_the_kv_on_the_device_without_copying_it_from_the_host(
    standin, bmodel, monkeypatch, tiny_chat_model, tiny_chat_tokenizer, soc
):
    sail = standin(soc=soc)
    engines = device_engines(sail, monkeypatch)
    path = bmodel(tiny_chat_model, addr_mode=1, io_dtype="bfloat16")  # static: KV in runtime memory
    engine = LLMEngine(SailGraphs(path), tiny_chat_tokenizer, "tiny", GREEDY_DEFAULTS)
    fresh = chat_answer(LLMEngine(SailGraphs(path), tiny_chat_tokenizer, "tiny", GREEDY_DEFAULTS))
    device = engines[0]
    steps = []
    process, copy = sail.EngineLLM.process, sail.Tensor.update_data
    copied: list[int] = []

    def fail_in_the_fourth_decode_step(self, graph_name, *args):
        if self is device and graph_name == "block_cache_1":
            steps.append(graph_name)
            if len(steps) == 4:
                raise sail.SailEngineError("injected device fault")
        return process(self, graph_name, *args)

    def counted(self, data):
        copied.append(data.nbytes)
        return copy(self, data)

    monkeypatch.setattr(sail.EngineLLM, "process", fail_in_the_fourth_decode_step)
    monkeypatch.setattr(sail.Tensor, "update_data", counted)
    with pytest.raises(EngineError, match="injected device fault"):
        list(engine.generate(QUESTION, threading.Event()))
    copied.clear()
    engine._graphs.reset()

    assert copied == []  # a device-side fill: nothing crosses from the host
    assert all(not array.any() for array in kv_on_device(device, 2))
    assert chat_answer(engine) == fresh != ""


# --- risk 3: the view constructor exists only from sail 3.9.1 on ------------------------------------


def test_risk3_a_sail_without_the_view_constructor_is_refused_at_load(standin, bmodel):
    standin(version="3.9.0")
    with pytest.raises(SailTooOldError, match=r"sophon-sail 3\.9\.0 is too old: .* >= 3\.9\.1"):
        SailGraphs(bmodel())


def test_risk3_the_minimum_sail_loads(standin, bmodel, qwen):
    standin(version="3.9.1")
    assert greedy(SailGraphs(bmodel(dynamic=True)))[0] == greedy(NumpyGraphs(qwen, SEQ_LEN))[0]


# --- risk 4: prefill length (MAX_INPUT_LENGTH) and KV length (SEQLEN) compiled apart -----------------


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_risk4_a_shorter_prefill_than_kv_cache_is_driven_to_the_full_context(
    standin,
    bmodel,
    qwen,
    dynamic,
):
    standin()
    graphs = SailGraphs(bmodel(max_input_length=16, dynamic=dynamic, io_dtype="bfloat16"))
    assert (graphs.spec.seq_len, graphs.spec.prefill_length) == (SEQ_LEN, 16)
    expected_tokens, _ = greedy(NumpyGraphs(qwen, SEQ_LEN))
    tokens, _ = greedy(graphs)
    assert len(tokens) == SEQ_LEN - len(PROMPT)  # decoded on past the prefill length
    assert tokens == expected_tokens


def test_risk4_a_prompt_longer_than_the_prefill_graphs_is_refused_with_the_reason(
    standin, bmodel, tiny_chat_model, tiny_chat_tokenizer
):
    standin()
    graphs = SailGraphs(bmodel(tiny_chat_model, max_input_length=16))
    engine = LLMEngine(graphs, tiny_chat_tokenizer, "tiny", GREEDY_DEFAULTS)
    with pytest.raises(RequestError, match="its longest prompt, 16 tokens"):
        chat_answer(engine)


def test_risk4_embedding_and_block_lengths_that_differ_are_refused_at_load(standin, bmodel, monkeypatch):
    sail = standin()
    shape = sail.EngineLLM.get_input_shape

    def block_0_longer(self, graph, index, stage=0):
        got = shape(self, graph, index, stage)
        return [1, 48, got[2]] if (graph, index) == ("block_0", 0) else got

    monkeypatch.setattr(sail.EngineLLM, "get_input_shape", block_0_longer)
    with pytest.raises(BmodelLayoutError, match=r"block_0 input 0 is \[1, 48, 32\], expected \[1, 64, 32\]"):
        SailGraphs(bmodel())


# --- risk 5: the embedding's dtype is not the blocks' -------------------------------------------------


def test_risk5_a_bf16_embedding_beside_f16_blocks_is_converted(
    standin,
    bmodel,
    qwen,
):
    """gen_bmodel.sh compiles the embedding BF16 whatever the blocks' mode (f16 here)."""
    standin()
    graphs = SailGraphs(bmodel(io_dtype="float16", embedding_dtype="bfloat16", dynamic=True))
    expected_tokens, expected_logits = greedy(NumpyGraphs(qwen, SEQ_LEN))
    tokens, logits = greedy(graphs)
    assert tokens == expected_tokens
    assert max(np.abs(a - b).max() for a, b in zip(logits, expected_logits, strict=True)) < 0.05


def test_risk5_an_lm_head_taking_another_dtype_than_the_blocks_give_is_fed_converted(standin, bmodel, qwen):
    standin()
    graphs = SailGraphs(bmodel(io_dtype="bfloat16", lm_head_input_dtype="float16", dynamic=True))
    assert greedy(graphs)[0] == greedy(NumpyGraphs(qwen, SEQ_LEN))[0]


def test_risk5_kv_of_another_dtype_than_the_activations_is_refused_at_load(standin, bmodel, monkeypatch):
    sail = standin()
    dtype = sail.EngineLLM.get_input_dtype

    def bf16_history(self, graph, index):
        return sail.Dtype.BM_BFLOAT16 if (graph, index) == ("block_cache_1", 3) else dtype(self, graph, index)

    monkeypatch.setattr(sail.EngineLLM, "get_input_dtype", bf16_history)
    with pytest.raises(
        BmodelLayoutError, match=r"block_cache_1 input 3 is Dtype\.BM_BFLOAT16, but block_0's"
    ):
        SailGraphs(bmodel(io_dtype="float16"))


# --- risk 6: host work per layer; logits copied for greedy requests -----------------------------------


class Watched(np.ndarray):
    """An array that counts the elements host code reads from it (numpy functions, ufuncs, copies)."""

    touched = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        Watched.touched += sum(x.size for x in inputs if isinstance(x, Watched))
        plain = tuple(x.view(np.ndarray) if isinstance(x, Watched) else x for x in inputs)
        return getattr(ufunc, method)(*plain, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        Watched.touched += self.size
        plain = tuple(x.view(np.ndarray) if isinstance(x, Watched) else x for x in args)
        return func(*plain, **kwargs)

    def astype(self, *args, **kwargs):
        Watched.touched += self.size
        return self.view(np.ndarray).astype(*args, **kwargs)

    def copy(self, *args, **kwargs):
        Watched.touched += self.size
        return self.view(np.ndarray).copy(*args, **kwargs)


def test_risk6_only_layer_0_of_a_step_touches_the_positions_and_mask_on_the_host(standin, bmodel):
    standin()
    graphs = SailGraphs(bmodel(dynamic=True, io_dtype="bfloat16"))
    length = len(PROMPT)
    positions = np.arange(length, dtype=np.int32)[None].view(Watched)
    mask = prefill_mask(length, length).view(Watched)
    hidden = graphs.embedding(np.array([PROMPT], dtype=np.int32))
    hidden = graphs.block(0, hidden, positions, mask)
    Watched.touched = 0
    graphs.block(1, hidden, positions, mask)
    assert Watched.touched == 0

    decode_mask = np.zeros((1, 1, 1, SEQ_LEN + 1), dtype=np.float32).view(Watched)
    decode_mask[..., length + 1 : SEQ_LEN] = -10000.0
    hidden = graphs.embedding_cache(PROMPT[-1])
    hidden = graphs.block_cache(0, hidden, length, decode_mask)
    Watched.touched = 0
    graphs.block_cache(1, hidden, length, decode_mask)
    assert Watched.touched == 0


def test_risk6_greedy_requests_take_the_token_from_greedy_head_on_the_chip(
    standin, bmodel, monkeypatch, tiny_chat_model, tiny_chat_tokenizer
):
    sail = standin()
    path = bmodel(tiny_chat_model, io_dtype="bfloat16", sampling_heads=True)
    graphs = SailGraphs(path)
    assert graphs.spec.device_greedy
    chat_weights = load_hf_checkpoint(tiny_chat_model)
    numpy_graphs = NumpyGraphs(chat_weights, SEQ_LEN)
    reference = chat_answer(LLMEngine(numpy_graphs, tiny_chat_tokenizer, "tiny", GREEDY_DEFAULTS))
    read = sail.Tensor.asnumpy
    sizes: list[int] = []

    def counted(self, *args):
        values = read(self, *args)
        sizes.append(values.size)
        return values

    monkeypatch.setattr(sail.Tensor, "asnumpy", counted)
    engine = LLMEngine(graphs, tiny_chat_tokenizer, "tiny", GREEDY_DEFAULTS)
    assert chat_answer(engine) == reference != ""
    assert sizes and max(sizes) == 1  # one token id per step, never a row of logits

    sizes.clear()
    sampled = ChatRequest("", (Turn(USER, "Hi"),), SamplingParams(temperature=0.8, seed=3, max_new_tokens=4))
    assert chat_answer(engine, sampled)
    assert max(sizes) == chat_weights.arch.vocab_size  # sampling still gets the logits


@pytest.mark.parametrize("lm_head", ["token_id", "token_id_1d", "top_k"])
def test_every_token_id_head_shape_decodes_greedily(standin, bmodel, qwen, lm_head):
    standin()
    graphs = SailGraphs(bmodel(lm_head=lm_head, io_dtype="bfloat16"))
    tokens, heads = greedy(graphs)
    assert heads == []
    assert tokens == greedy(NumpyGraphs(qwen, SEQ_LEN, is_dynamic=False))[0]


# --- multi-chip bmodels (sophon-demo's 2dev layout) ----------------------------------------------


@pytest.mark.parametrize("soc", [False, True], ids=["pcie", "soc"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_a_2dev_bmodel_runs_on_a_device_group(standin, bmodel, qwen, soc, dynamic):
    standin(soc=soc, tpus=4)
    graphs = SailGraphs(bmodel(num_device=2, addr_mode=1, dynamic=dynamic, io_dtype="bfloat16"), (2, 3))
    assert graphs.layout.devices == 2
    expected_tokens, _ = greedy(NumpyGraphs(qwen, SEQ_LEN, is_dynamic=dynamic))
    tokens, _ = greedy(graphs)
    assert tokens == expected_tokens
    graphs.reset()
    assert all(not array.any() for layer in range(2) for array in graphs.read_kv(layer))


def test_a_bmodel_for_another_device_count_is_refused(standin, bmodel):
    standin(tpus=2)
    hint = r"compiled for 1 device\(s\)\? A bmodel for N devices needs a group of N chips"
    with pytest.raises(
        SailLoadError, match=r"could not load tiny\.bmodel on device 0: SailEngineError: .*" + hint
    ):
        SailGraphs(bmodel(num_device=2), 0)
    with pytest.raises(SailLoadError, match=r"on device 0,1: SailEngineError: EngineLLM related error!"):
        SailGraphs(bmodel(), (0, 1))
