"""The generation driver against the graph contract: what it feeds each graph (ids, positions, masks,
KV offsets) in dynamic and static mode, and when it stops (EOS, max_new_tokens, context, cancel)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tests.probe_graphs import ProbeGraphs
from tests.tiny_models import random_tensors, tiny_config, write_hf_checkpoint
from worker.core.checkpoint import Weights, load_hf_checkpoint
from worker.core.driver import Generation
from worker.core.graphs import MASK_VALUE
from worker.core.numpy_graphs import NumpyGraphs
from worker.core.request import FinishReason

SEQ_LEN = 16
PROMPT = [4, 8, 15, 16, 23]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Weights:
    config = tiny_config("qwen2", layers=2)
    folder = write_hf_checkpoint(
        tmp_path_factory.mktemp("tiny"), config, random_tensors(config, seed=0, bias=True)
    )
    return load_hf_checkpoint(folder)


def probe(weights: Weights, *, dynamic: bool = True, greedy_head: bool = False) -> ProbeGraphs:
    return ProbeGraphs(NumpyGraphs(weights, SEQ_LEN, is_dynamic=dynamic), greedy_head=greedy_head)


def greedy(logits: np.ndarray, tokens: list[int]) -> int:
    return int(np.argmax(logits))


def run(
    graphs, prompt=PROMPT, pick=greedy, max_new_tokens=100, eos=(), cancel=None
) -> tuple[list[int], Generation]:
    generation = Generation(graphs, prompt, pick, max_new_tokens, eos, cancel or threading.Event())
    return list(generation), generation


def test_dynamic_prefill_runs_at_prompt_length_with_a_causal_mask(weights):
    graphs = probe(weights)
    run(graphs, max_new_tokens=1)

    (embedding,) = graphs.named("embedding")
    np.testing.assert_array_equal(embedding.args[0], [PROMPT])
    assert embedding.args[0].dtype == np.int32
    blocks = graphs.named("block")
    assert [call.args[0] for call in blocks] == [0, 1]
    _, position_ids, mask = blocks[0].args
    np.testing.assert_array_equal(position_ids, [np.arange(5)])
    expected = np.where(np.tril(np.ones((5, 5), dtype=bool)), 0.0, MASK_VALUE)
    np.testing.assert_array_equal(mask, expected[None, None])
    assert mask.dtype == np.float32
    assert graphs.named("lm_head")[0].args == (4,)


def test_static_prefill_pads_to_seq_len_and_masks_the_padding(weights):
    graphs = probe(weights, dynamic=False)
    run(graphs, max_new_tokens=1)

    (embedding,) = graphs.named("embedding")
    assert embedding.args[0].shape == (1, SEQ_LEN)
    np.testing.assert_array_equal(embedding.args[0][0, :5], PROMPT)
    _, position_ids, mask = graphs.named("block")[0].args
    assert position_ids.shape == (1, SEQ_LEN) and mask.shape == (1, 1, SEQ_LEN, SEQ_LEN)
    np.testing.assert_array_equal(position_ids[0, :5], np.arange(5))
    visible = mask[0, 0] == 0.0
    assert visible[:5, :5].tolist() == np.tril(np.ones((5, 5), dtype=bool)).tolist()
    assert not visible[:, 5:].any() and not visible[5:].any()  # padding neither seen nor seeing
    assert np.all((mask == 0.0) | (mask == MASK_VALUE))
    assert graphs.named("lm_head")[0].args == (4,)


def test_decode_steps_advance_positions_and_masks(weights):
    graphs = probe(weights)
    tokens, _ = run(graphs, max_new_tokens=4)

    steps = [call for call in graphs.named("block_cache") if call.args[0] == 0]
    assert [call.args[1] for call in steps] == [5, 6, 7]  # the prompt holds positions 0..4
    assert [call.args[0] for call in graphs.named("embedding_cache")] == tokens[:3]
    for call in steps:
        position, mask = call.args[1], call.args[2]
        assert mask.shape == (1, 1, 1, SEQ_LEN + 1) and mask.dtype == np.float32
        expected = np.full(SEQ_LEN + 1, MASK_VALUE, dtype=np.float32)
        expected[:position] = 0.0
        expected[-1] = 0.0
        np.testing.assert_array_equal(mask[0, 0, 0], expected)
    assert [call.args for call in graphs.named("lm_head")] == [(4,), (0,), (0,), (0,)]


def test_max_new_tokens_ends_with_length(weights):
    tokens, generation = run(probe(weights), max_new_tokens=3)
    assert len(tokens) == 3
    assert generation.finish_reason is FinishReason.LENGTH


def test_full_context_ends_with_length_and_never_writes_past_the_cache(weights):
    graphs = probe(weights)
    tokens, generation = run(graphs, max_new_tokens=100)

    assert len(PROMPT) + len(tokens) == SEQ_LEN
    assert generation.finish_reason is FinishReason.LENGTH
    assert max(call.args[1] for call in graphs.named("block_cache")) == SEQ_LEN - 2


def test_end_of_sequence_stops_and_is_not_yielded(weights):
    answers = iter([11, 12, 2, 13])
    tokens, generation = run(probe(weights), pick=lambda logits, tokens: next(answers), eos={2})
    assert tokens == [11, 12]
    assert generation.finish_reason is FinishReason.STOP


def test_picker_sees_prompt_and_generated_tokens(weights):
    seen: list[list[int]] = []

    def pick(logits: np.ndarray, tokens: list[int]) -> int:
        seen.append(list(tokens))
        return 30 + len(seen)

    run(probe(weights), pick=pick, max_new_tokens=3)
    assert seen == [PROMPT, [*PROMPT, 31], [*PROMPT, 31, 32]]


def test_cancel_before_start_runs_no_graph(weights):
    graphs = probe(weights)
    cancel = threading.Event()
    cancel.set()
    tokens, generation = run(graphs, cancel=cancel)
    assert tokens == [] and graphs.calls == []
    assert generation.finish_reason is FinishReason.CANCELLED


def test_cancel_between_steps_stops_within_one_token(weights):
    graphs = probe(weights)
    cancel = threading.Event()
    generation = Generation(graphs, PROMPT, greedy, 100, (), cancel)
    tokens = []
    for token in generation:
        tokens.append(token)
        if len(tokens) == 2:
            cancel.set()
    assert len(tokens) == 2
    assert generation.finish_reason is FinishReason.CANCELLED
    assert len(graphs.named("embedding_cache")) == 1  # no decode step after the cancel


def test_token_id_head_is_used_as_is(weights):
    expected, _ = run(probe(weights), max_new_tokens=6)

    def must_not_sample(logits: np.ndarray, tokens: list[int]) -> int:
        raise AssertionError("a TOKEN_ID head must not be sampled on the host")

    tokens, _ = run(probe(weights, greedy_head=True), pick=must_not_sample, max_new_tokens=6)
    assert tokens == expected


@pytest.mark.parametrize("prompt", [[], list(range(SEQ_LEN))], ids=["empty", "full"])
def test_prompts_that_leave_no_room_are_refused(weights, prompt):
    graphs = probe(weights)
    with pytest.raises(ValueError) as refused:
        Generation(graphs, prompt, greedy, 10, (), threading.Event())
    prefill = graphs.spec.prefill_length
    expected = f"prompt of {len(prompt)} tokens must be 1..{min(prefill, SEQ_LEN - 1)} (seq_len {SEQ_LEN}, "
    assert str(refused.value) == f"{expected}prefill length {prefill})"


def test_the_shortest_and_longest_prompts_and_answers_are_accepted(weights):
    assert len(run(probe(weights), prompt=[5], max_new_tokens=1)[0]) == 1
    tokens, generation = run(probe(weights), prompt=list(range(1, SEQ_LEN)), max_new_tokens=10)
    assert len(tokens) == 1 and generation.finish_reason is FinishReason.LENGTH  # the context is full
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        Generation(probe(weights), PROMPT, greedy, 0, (), threading.Event())
