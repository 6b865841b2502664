"""The one generation driver: runs any ModelGraphs (numpy or chip) from a prompt to a finish reason.

It owns everything position-related: prefill (padded to seq_len with masks hiding the padding for
static graphs, at the prompt's length for dynamic ones), decode steps with their position and mask,
the KV-cache capacity (seq_len) and the stop conditions. Masks follow the bmodel export
(sophon-demo `sample/Qwen`): 0 where attention is allowed, MASK_VALUE where it is not.

A generation may start from a prefix already in the KV cache (`cached` leading prompt tokens whose
keys/values an earlier generation left in rows 0..cached-1): it then prefills only the rest with
the prefill-with-history graph, as LLM-TPU's multi-turn demos do (models/Qwen3/python_demo/chat.cpp,
`forward_first_with_kv`). `computed` always lists the tokens whose keys/values the cache holds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator, Sequence

import numpy as np

from worker.core.graphs import MASK_VALUE, GraphSpec, HeadKind, Hidden, ModelGraphs
from worker.core.request import FinishReason

# Chooses the next token from the head's logits [V] and all tokens so far (prompt + generated).
TokenPicker = Callable[[np.ndarray, Sequence[int]], int]


class Generation:
    """One generation. Iterate it for the generated token ids (end-of-sequence ids are not
    yielded); `finish_reason` is set when the last token is yielded (or, for an end-of-sequence
    id, when the iteration ends) and says why it ended. The cancel flag is checked before the
    prefill and between steps, so a cancelled generation stops within one token."""

    def __init__(
        self,
        graphs: ModelGraphs,
        prompt_ids: Sequence[int],
        pick: TokenPicker,
        max_new_tokens: int,
        eos_ids: Collection[int],
        cancel: threading.Event,
        greedy: bool = False,
        cached: int = 0,
    ) -> None:
        seq_len, longest = graphs.spec.seq_len, min(graphs.spec.prefill_length, graphs.spec.seq_len - 1)
        if not 0 < len(prompt_ids) <= longest:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens must be 1..{longest} (seq_len {seq_len}, "
                f"prefill length {graphs.spec.prefill_length})"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self._graphs = graphs
        self._prompt = list(prompt_ids)
        self.prompt_length = len(self._prompt)
        self._pick = pick
        self._max_new_tokens = max_new_tokens
        self._eos_ids = frozenset(eos_ids)
        self._cancel = cancel
        # A greedy pick with a greedy_head on the device: one token id crosses to the host, not logits.
        self._greedy_on_device = greedy and graphs.spec.device_greedy
        # Leading prompt tokens kept from the KV cache: only the rest is prefilled.
        self.reused = usable_history(graphs.spec, cached, len(prompt_ids))
        self.finish_reason: FinishReason | None = None
        # Token ids whose keys/values are in KV-cache rows 0..len-1, as the steps write them.
        self.computed: list[int] = self._prompt[: self.reused]

    def __iter__(self) -> Iterator[int]:
        tokens = list(self._prompt)
        if self._cancel.is_set():
            self.finish_reason = FinishReason.CANCELLED
            return
        head_output = self._prefill_after_history(tokens) if self.reused else self._prefill(tokens)
        self.computed = list(tokens)
        decode_mask = np.full((1, 1, 1, self._graphs.spec.seq_len + 1), MASK_VALUE, dtype=np.float32)
        decode_mask[..., -1] = 0.0  # the new token always sees itself
        while True:
            token = self._choose(head_output, tokens)
            if token in self._eos_ids:
                self.finish_reason = FinishReason.STOP
                return
            tokens.append(token)
            # Decided before the token is handed out, so the caller can put the last token's text
            # into its final chunk instead of sending a frame that adds no token after it.
            self.finish_reason = self._limit_reached(len(tokens))
            yield token
            if self.finish_reason is None and self._cancel.is_set():
                self.finish_reason = FinishReason.CANCELLED
            if self.finish_reason is not None:
                return
            position = len(tokens) - 1
            decode_mask[..., :position] = 0.0
            head_output = self._decode(token, position, decode_mask)
            self.computed.append(token)

    def _limit_reached(self, total_tokens: int) -> FinishReason | None:
        if total_tokens - len(self._prompt) >= self._max_new_tokens:
            return FinishReason.LENGTH
        if total_tokens >= self._graphs.spec.seq_len:
            return FinishReason.LENGTH  # the next token would have no KV-cache row
        return None

    def _prefill(self, tokens: list[int]) -> np.ndarray:
        graphs = self._graphs
        prompt_length = len(tokens)
        length = prompt_length if graphs.spec.is_dynamic else graphs.spec.prefill_length
        input_ids = np.zeros((1, length), dtype=np.int32)
        input_ids[0, :prompt_length] = tokens
        position_ids = np.zeros((1, length), dtype=np.int32)
        position_ids[0, :prompt_length] = np.arange(prompt_length)
        hidden = graphs.embedding(input_ids)
        mask = prefill_mask(prompt_length, length)
        for layer in range(graphs.spec.num_layers):
            hidden = graphs.block(layer, hidden, position_ids, mask)
        return self._head(hidden, prompt_length - 1)

    def _prefill_after_history(self, tokens: list[int]) -> np.ndarray:
        graphs, start = self._graphs, self.reused
        length = len(tokens) - start
        input_ids = np.array([tokens[start:]], dtype=np.int32)
        position_ids = np.arange(start, len(tokens), dtype=np.int32).reshape(1, length)
        hidden = graphs.embedding(input_ids)
        mask = history_prefill_mask(start, length)
        for layer in range(graphs.spec.num_layers):
            hidden = graphs.block_with_history(layer, hidden, position_ids, mask, start)
        return self._head(hidden, length - 1)

    def _decode(self, token: int, position: int, mask: np.ndarray) -> np.ndarray:
        graphs = self._graphs
        hidden = graphs.embedding_cache(token)
        for layer in range(graphs.spec.num_layers):
            hidden = graphs.block_cache(layer, hidden, position, mask)
        return self._head(hidden, 0)

    def _head(self, hidden: Hidden, index: int) -> np.ndarray:
        if self._greedy_on_device:
            return np.array([self._graphs.greedy_token(hidden, index)], dtype=np.int32)
        return self._graphs.lm_head(hidden, index)

    def _choose(self, head_output: np.ndarray, tokens: list[int]) -> int:
        if self._graphs.spec.head is HeadKind.TOKEN_ID or self._greedy_on_device:
            return int(head_output.reshape(-1)[0])
        return self._pick(head_output, tokens)


def prefill_mask(prompt_length: int, length: int) -> np.ndarray:
    """[1, 1, length, length]: causal over the prompt; padding rows and columns hidden."""
    mask = np.full((1, 1, length, length), MASK_VALUE, dtype=np.float32)
    causal = np.tril(np.ones((prompt_length, prompt_length), dtype=bool))
    mask[0, 0, :prompt_length, :prompt_length][causal] = 0.0
    return mask


def usable_history(spec: GraphSpec, cached: int, prompt_length: int) -> int:
    """How many cached prompt positions the prefill may keep. The last prompt token is always
    computed (its logits pick the first new token); the history graph attends to at most
    max_history rows (a longer shared prefix keeps only those); and LLM-TPU compiles history graphs
    dynamic only (`--use_history_kv` forces `--dynamic`, docs/LLM_Convert_Pipeline.md), so a
    static backend always prefills from 0."""
    if not spec.is_dynamic or cached < 0:
        return 0
    return min(cached, prompt_length - 1, spec.max_history)


def history_prefill_mask(start: int, length: int) -> np.ndarray:
    """[1, 1, length, start + length]: every new position sees all `start` cached ones, and the new
    ones causally."""
    mask = np.zeros((1, 1, length, start + length), dtype=np.float32)
    mask[0, 0, :, start:][~np.tril(np.ones((length, length), dtype=bool))] = MASK_VALUE
    return mask
