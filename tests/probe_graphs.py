"""Probing the driver and graphs in tests: a ModelGraphs wrapper that records every call the driver
makes, can fail on demand and can act as a greedy-only bmodel (lm_head returning a token id, as in
qwen-7b_int4_1dev.bmodel); and teacher forcing through the real driver to read its logits."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import numpy as np

from worker.core.driver import Generation
from worker.core.graphs import HeadKind, ModelGraphs
from worker.core.numpy_graphs import NumpyGraphs


@dataclass(frozen=True)
class Call:
    graph: str
    args: tuple


class ProbeGraphs:
    def __init__(self, inner: NumpyGraphs, *, greedy_head: bool = False) -> None:
        self.inner = inner
        self.spec = replace(inner.spec, head=HeadKind.TOKEN_ID) if greedy_head else inner.spec
        self.calls: list[Call] = []
        self.fail_at_call: int | None = None  # raise when this many calls have been made (once)
        self.forced_tokens: dict[int, int] = {}  # lm_head call number (from 1) -> the token it must favour

    def _record(self, graph: str, *args: object) -> None:
        self.calls.append(Call(graph, tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args)))
        if self.fail_at_call is not None and len(self.calls) >= self.fail_at_call:
            self.fail_at_call = None
            raise RuntimeError(f"injected failure in {graph}")

    def named(self, graph: str) -> list[Call]:
        return [call for call in self.calls if call.graph == graph]

    def embedding(self, input_ids: np.ndarray) -> np.ndarray:
        self._record("embedding", input_ids)
        return self.inner.embedding(input_ids)

    def block(self, layer: int, hidden: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self._record("block", layer, position_ids, mask)
        return self.inner.block(layer, hidden, position_ids, mask)

    def block_with_history(
        self, layer: int, hidden: np.ndarray, position_ids: np.ndarray, mask: np.ndarray, start: int
    ) -> np.ndarray:
        self._record("block_with_history", layer, position_ids, mask, start)
        return self.inner.block_with_history(layer, hidden, position_ids, mask, start)

    def embedding_cache(self, token_id: int) -> np.ndarray:
        self._record("embedding_cache", token_id)
        return self.inner.embedding_cache(token_id)

    def block_cache(self, layer: int, hidden: np.ndarray, position: int, mask: np.ndarray) -> np.ndarray:
        self._record("block_cache", layer, position, mask)
        return self.inner.block_cache(layer, hidden, position, mask)

    def lm_head(self, hidden: np.ndarray, index: int) -> np.ndarray:
        self._record("lm_head", index)
        logits = self.inner.lm_head(hidden, index)
        forced = self.forced_tokens.get(len(self.named("lm_head")))
        if forced is not None:  # e.g. an end-of-sequence token, which the tiny model never picks itself
            logits = logits.copy()
            logits[..., forced] = logits.max() + 100.0
        if self.spec.head is HeadKind.TOKEN_ID:
            return np.array([np.argmax(logits)], dtype=np.int32)
        return logits

    def greedy_token(self, hidden: np.ndarray, index: int) -> int:
        """As a `greedy_head` graph: the argmax chosen on the device (declare it with spec.device_greedy)."""
        self._record("greedy_token", index)
        return int(np.argmax(self.inner.lm_head(hidden, index)))

    def reset(self) -> None:
        self._record("reset")
        self.inner.reset()


class ForcedTokens:
    """A TokenPicker that records the logits it is shown and answers with given tokens (teacher forcing)."""

    def __init__(self, forced: list[int]) -> None:
        self.forced = forced
        self.logits: list[np.ndarray] = []

    def __call__(self, logits: np.ndarray, tokens: list[int]) -> int:
        self.logits.append(logits.copy())
        return self.forced[len(self.logits) - 1]


def driver_logits(graphs: ModelGraphs, prompt: list[int], forced: list[int]) -> np.ndarray:
    """Logits [len(forced), V] the driver produced: after the prefill, then after each forced token
    but the last (rows len(prompt) - 1 .. len(prompt + forced) - 2 of a full forward)."""
    picker = ForcedTokens(forced)
    generation = Generation(graphs, prompt, picker, len(forced), eos_ids=(), cancel=threading.Event())
    assert list(generation) == forced
    return np.stack(picker.logits)
