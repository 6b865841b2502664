"""Host-side token choice: greedy, temperature, top-k, top-p, repetition penalty, seeded draws."""

from __future__ import annotations

import numpy as np
import pytest

from worker.core.sampling import (
    _PARTIAL_SORT_SIZE,
    Sampler,
    SamplingConfig,
    most_probable_first,
    penalize_repetition,
    softmax,
    top_k_candidates,
    top_p_candidates,
)

VOCAB = 1000


def random_logits(seed: int) -> np.ndarray:
    return (3.0 * np.random.default_rng(seed).standard_normal(VOCAB)).astype(np.float32)


def draws(config: SamplingConfig, logits: np.ndarray, count: int) -> list[int]:
    sampler = Sampler(config)
    return [sampler(logits, []) for _ in range(count)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = random_logits(0)
    config = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=1234)

    first, again = draws(config, logits, 200), draws(config, logits, 200)
    other = draws(SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=4321), logits, 200)

    assert first == again
    assert first != other
    assert len(set(first)) > 5  # really sampling, not stuck on one token


@pytest.mark.parametrize("seed", range(20))
def test_cuts_that_leave_one_candidate_equal_greedy(seed):
    logits = random_logits(seed)
    best = int(np.argmax(logits))
    assert Sampler(SamplingConfig(temperature=0.0))(logits, []) == best
    assert draws(SamplingConfig(temperature=2.0, top_k=1, seed=seed), logits, 20) == [best] * 20
    assert draws(SamplingConfig(temperature=2.0, top_p=1e-6, seed=seed), logits, 20) == [best] * 20


def test_repetition_penalty_changes_the_greedy_choice_only_inside_the_window():
    logits = np.array([2.0, 1.9, -1.0, 0.5], dtype=np.float32)
    original = logits.copy()
    penalized = penalize_repetition(logits, [0, 2, 0], 1.2)
    # Once per distinct token; positive logits divided, negative ones multiplied.
    np.testing.assert_allclose(penalized, [2.0 / 1.2, 1.9, -1.2, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(logits, original)  # the input is not modified

    config = SamplingConfig(temperature=0.0, repetition_penalty=1.2, penalty_window=2)
    assert Sampler(SamplingConfig(temperature=0.0))(logits, [3, 0, 3]) == 0
    assert Sampler(config)(logits, [3, 0, 3]) == 1  # token 0 seen in the last two tokens
    assert Sampler(config)(logits, [0, 3, 3]) == 0  # token 0 is older than the window


def frequencies(config: SamplingConfig, probabilities: list[float], count: int = 20000) -> np.ndarray:
    logits = np.log(np.array(probabilities, dtype=np.float32))
    return np.bincount(draws(config, logits, count), minlength=len(probabilities)) / count


def test_draws_follow_the_distribution_with_temperature_and_cuts():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    plain = frequencies(SamplingConfig(temperature=1.0, seed=7), list(p))
    np.testing.assert_allclose(plain, p, atol=0.015)

    sharpened = frequencies(SamplingConfig(temperature=0.5, seed=8), list(p))
    np.testing.assert_allclose(sharpened, p**2 / np.sum(p**2), atol=0.015)

    top_k = frequencies(SamplingConfig(temperature=1.0, top_k=2, seed=9), list(p))
    np.testing.assert_allclose(top_k, [0.625, 0.375, 0.0, 0.0], atol=0.015)

    top_p = frequencies(SamplingConfig(temperature=1.0, top_p=0.8, seed=10), list(p))
    np.testing.assert_allclose(top_p, [0.625, 0.375, 0.0, 0.0], atol=0.015)  # 0.5 + 0.3 reaches 0.8

    top_p_wider = frequencies(SamplingConfig(temperature=1.0, top_p=0.81, seed=11), list(p))
    np.testing.assert_allclose(top_p_wider, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.015)


# Flat logits: the nucleus spans most of the vocabulary (full sort); peaked: a few hundred tokens
# hold 0.9 of the mass (partial sort).
@pytest.mark.parametrize("spread", [0.5, 8.0])
def test_top_p_on_a_large_vocabulary_keeps_the_exact_nucleus(spread):
    logits = np.random.default_rng(6).standard_normal(152064) * spread
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    ids = np.arange(152064)

    kept, kept_probabilities = top_p_candidates(ids, probabilities, 0.9)

    order = np.argsort(-probabilities, kind="stable")
    cumulative = np.cumsum(probabilities[order])
    expected = order[: int(np.searchsorted(cumulative, 0.9)) + 1]  # first prefix reaching 0.9
    assert sorted(kept.tolist()) == sorted(expected.tolist())
    np.testing.assert_array_equal(kept_probabilities, probabilities[kept])
    assert np.all(np.diff(kept_probabilities) <= 0)


def test_large_vocabulary_sampling_returns_valid_ids():
    logits = (np.random.default_rng(3).standard_normal(152064) * 4).astype(np.float32)
    tokens = draws(SamplingConfig(temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=3), logits, 20)
    assert all(isinstance(token, int) and 0 <= token < 152064 for token in tokens)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_invalid_settings_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**setting)


def test_the_penalty_divides_positive_logits_multiplies_negative_ones_once_per_token():
    logits = np.array([0.5, -0.5, 4.0, 0.0, 3.0], dtype=np.float32)
    penalized = penalize_repetition(logits, [0, 1, 1, 2, 3], 2.0)
    assert penalized.tolist() == [0.25, -1.0, 2.0, 0.0, 3.0]
    assert logits.tolist() == [0.5, -0.5, 4.0, 0.0, 3.0]  # a new array: the caller's logits stay


@pytest.mark.parametrize(("window", "expected"), [(0, 1), (1, 2), (2, 0)])
def test_a_penalty_of_two_looks_back_exactly_penalty_window_tokens(window, expected):
    logits = np.array([3.0, 3.5, 3.2], dtype=np.float32)
    sampler = Sampler(SamplingConfig(repetition_penalty=2.0, penalty_window=window))
    # History ends ...2, 1: window 0 = no penalty (1 wins), 1 = token 1 only (2 wins), 2 = both (0 wins).
    assert sampler(logits, [2, 2, 1]) == expected


def test_softmax_of_huge_logits_is_finite_and_exact():
    probabilities = softmax(np.array([1000.0, 1000.0, 999.0], dtype=np.float32))
    expected = np.exp([0.0, 0.0, -1.0]) / np.exp([0.0, 0.0, -1.0]).sum()
    assert np.allclose(probabilities, expected, rtol=0, atol=1e-12)


def test_top_p_stops_at_the_token_whose_predecessors_reach_the_mass():
    ids, kept = top_p_candidates(np.array([7, 8, 9]), np.array([0.25, 0.5, 0.25]), 0.5)
    assert (ids.tolist(), kept.tolist()) == ([8], [0.5])  # mass before the second is 0.5: not < 0.5


def test_top_k_zero_keeps_every_token_and_top_k_cuts_to_the_best():
    logits = np.arange(10, dtype=np.float32)
    ids, values = top_k_candidates(logits, 0)
    assert ids.tolist() == list(range(10)) and values.tolist() == logits.tolist()
    ids, _ = top_k_candidates(logits, 3)
    assert sorted(ids.tolist()) == [7, 8, 9]


def test_the_nucleus_of_a_vocabulary_larger_than_the_partial_sort_is_its_most_probable_tokens():
    rng = np.random.default_rng(5)
    probabilities = rng.random(8 * _PARTIAL_SORT_SIZE)
    probabilities /= probabilities.sum()
    order = most_probable_first(probabilities, 0.01)
    assert np.all(np.diff(probabilities[order]) <= 0)  # descending
    assert set(order.tolist()) == set(np.argsort(probabilities)[-len(order) :].tolist())
    assert probabilities[order].sum() >= 0.01


def test_a_penalty_window_of_zero_is_accepted_and_a_negative_one_refused():
    assert SamplingConfig(penalty_window=0).penalty_window == 0
    with pytest.raises(ValueError, match="penalty_window must be >= 0, got -1"):
        SamplingConfig(penalty_window=-1)
