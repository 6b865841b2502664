"""Choosing the next token from logits on the host: repetition penalty, then greedy or sampling.

Everything is vectorized over the vocabulary; draws come from a numpy Generator seeded per request,
so the same seed gives the same output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_PARTIAL_SORT_SIZE = 512  # top-p sorts only this many most probable tokens when they suffice


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no cut
    top_p: float = 1.0  # 1 = no cut
    repetition_penalty: float = 1.0  # 1 = off
    penalty_window: int = 64  # recent tokens (prompt + generated) the penalty looks at
    seed: int | None = None  # None = fresh entropy

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.penalty_window < 0:
            raise ValueError(f"penalty_window must be >= 0, got {self.penalty_window}")

    @property
    def is_greedy(self) -> bool:
        """The pick is the plain argmax of the logits (no draw, no penalty)."""
        return self.temperature == 0.0 and (self.repetition_penalty == 1.0 or self.penalty_window == 0)


class Sampler:
    """A TokenPicker (see driver.py) for one request."""

    def __init__(self, config: SamplingConfig) -> None:
        self._config = config
        self._rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, tokens: Sequence[int]) -> int:
        config = self._config
        if config.repetition_penalty != 1.0 and config.penalty_window > 0:
            logits = penalize_repetition(logits, tokens[-config.penalty_window :], config.repetition_penalty)
        if config.temperature == 0.0:
            return int(np.argmax(logits))
        candidates, candidate_logits = top_k_candidates(logits, config.top_k)
        probabilities = softmax(candidate_logits / config.temperature)
        candidates, probabilities = top_p_candidates(candidates, probabilities, config.top_p)
        cumulative = np.cumsum(probabilities)
        draw = self._rng.random() * cumulative[-1]
        return int(candidates[min(np.searchsorted(cumulative, draw, side="right"), len(candidates) - 1)])


def penalize_repetition(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty (as in Hugging Face): a seen token's positive logit is divided by the
    penalty and a negative one multiplied, once per distinct token. Returns a new array."""
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    penalized = logits.copy()
    values = penalized[seen]
    penalized[seen] = np.where(values > 0, values / penalty, values * penalty)
    return penalized


def top_k_candidates(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top_k token ids and their logits (all tokens when top_k is 0 or covers the vocabulary)."""
    if top_k == 0 or top_k >= logits.shape[0]:
        return np.arange(logits.shape[0]), logits
    ids = np.argpartition(logits, -top_k)[-top_k:]
    return ids, logits[ids]


def top_p_candidates(
    ids: np.ndarray, probabilities: np.ndarray, top_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """The smallest most-probable set whose mass reaches top_p (never empty), in descending order."""
    if top_p >= 1.0:
        return ids, probabilities
    order = most_probable_first(probabilities, top_p)
    sorted_probabilities = probabilities[order]
    mass_before = np.cumsum(sorted_probabilities) - sorted_probabilities
    keep = int(np.count_nonzero(mass_before < top_p))
    return ids[order[:keep]], sorted_probabilities[:keep]


def most_probable_first(probabilities: np.ndarray, mass: float) -> np.ndarray:
    """Indices of the most probable entries, descending, at least enough of them to reach `mass`.

    Sorting a whole 150k vocabulary costs milliseconds per token; the nucleus is nearly always
    within the top few hundred, so those are sorted alone when they already hold the mass.
    """
    if len(probabilities) > _PARTIAL_SORT_SIZE:
        head = np.argpartition(probabilities, -_PARTIAL_SORT_SIZE)[-_PARTIAL_SORT_SIZE:]
        if probabilities[head].sum() >= mass:
            return head[np.argsort(probabilities[head])[::-1]]
    return np.argsort(probabilities)[::-1]


def softmax(logits: np.ndarray) -> np.ndarray:
    """In float64: these are small host-side vectors and the cumulative sums need the precision."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits)
    weights = np.exp(shifted)
    return weights / weights.sum()
