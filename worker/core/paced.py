"""The `paced` engine: a load-testing and capacity-planning backend that computes no model.

It streams short words at a fixed rate (PacedConfig: first_token_delay_s, then tokens_per_second,
tokens_per_request in all), so the router, queue, wire and clients can be measured, and pools sized,
under the timing of a real chip on any machine; tokens_per_second 0 streams as fast as it can (for
measuring the router's relay capacity). It honours the Engine contract like a real backend:
max_new_tokens, the context limit (prompt size estimated from the text), and `cancel`, which it
waits on between tokens so a cancel takes effect at once.

For tests and soaks it can echo the request (`echo`: the answer is the last user turn's words,
cycled) and inject faults into chosen requests (`fail_marker`, `hang_marker`, `fault_at_token`):
an engine error, or a step that never returns.

With `prefill_tokens_per_second` it models prefill cost too, and KV reuse as a real engine with
model.reuse_kv does it, at turn granularity: it remembers the conversation it last served (as the
prefix hashes of common/prefix_hash.py, which it reports like any engine) and charges only for the
prompt tokens after the turns a new request shares with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace

from common.config import ModelConfig
from common.prefix_hash import conversation_hashes
from worker.core.kv_prefix import common_prefix
from worker.core.request import ASSISTANT, ChatRequest, Chunk, EngineError, FinishReason, RequestError, Turn

_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do")
_BYTES_PER_TOKEN = 4  # the usual rough size of a BPE token in text
_TEMPLATE_TOKENS_PER_TURN = 4  # role markers a chat template adds around each turn


class PacedEngine:
    def __init__(self, model: ModelConfig) -> None:
        self.model_id = model.name
        self.context_size = model.context_size
        self._pace = model.paced
        self._default_max_new_tokens = model.defaults.max_new_tokens
        self._reuse_kv = model.reuse_kv
        self._held: tuple[int, ...] = ()  # the conversation prefixes its modelled KV cache holds

    def held_prefix(self) -> tuple[int, ...]:
        return self._held

    def generate(self, request: ChatRequest, cancel: threading.Event) -> Iterator[Chunk]:
        prompt_tokens = estimate_prompt_tokens(request)
        room = self.context_size - prompt_tokens
        if room <= 0:
            raise RequestError(
                f"the prompt (about {prompt_tokens} tokens) leaves no room in the context of "
                f"{self.context_size} tokens"
            )
        return self._with_prefill(request, cancel, prompt_tokens, room)

    def _with_prefill(
        self, request: ChatRequest, cancel: threading.Event, prompt_tokens: int, room: int
    ) -> Iterator[Chunk]:
        """The stream after the modelled prefill of the prompt tokens not held from the last
        conversation; what is held afterwards is recorded before the final chunk goes out."""
        cached = self._cached_tokens(request, prompt_tokens)
        rate = self._pace.prefill_tokens_per_second
        if rate:
            cancel.wait((prompt_tokens - cached) / rate)  # a cancel ends the wait: _stream notices it
        answer: list[str] = []
        failed = False
        try:
            for chunk in self._stream(request, cancel, prompt_tokens, room):
                answer.append(chunk.text)
                if chunk.finish_reason is not None:
                    self._remember(request, "".join(answer))
                yield replace(chunk, cached_prompt_tokens=cached)
        except EngineError:
            failed = True
            self._held = ()  # as a real engine resets its KV cache
            raise
        finally:
            if not failed:  # also when the caller closes the stream early
                self._remember(request, "".join(answer))

    def _cached_tokens(self, request: ChatRequest, prompt_tokens: int) -> int:
        """Estimated prompt tokens held from the last conversation: those of the shared turns."""
        if not self._reuse_kv or request.raw_prompt is not None:  # a raw prompt has no turns to share
            return 0
        depth = len(common_prefix(self._held, conversation_hashes(request.system_message, request.history)))
        if depth == 0:
            return 0
        texts = [request.system_message, *(turn.content for turn in request.history[: depth - 1])]
        return min(sum(map(_text_tokens, texts)), prompt_tokens - 1)

    def _remember(self, request: ChatRequest, answer: str) -> None:
        """The conversation the modelled KV cache holds after this request: its turns and the
        answer so far once a token is out (the prefill ran), else only what it shared with the
        previous one."""
        if not self._reuse_kv:
            return
        if request.raw_prompt is not None:
            self._held = ()  # a raw prompt replaced the conversation, and is none itself
            return
        turns = (*request.history, Turn(ASSISTANT, answer)) if answer else request.history
        hashes = conversation_hashes(request.system_message, turns)
        self._held = tuple(hashes if answer else common_prefix(self._held, hashes))

    def _stream(
        self, request: ChatRequest, cancel: threading.Event, prompt_tokens: int, room: int
    ) -> Iterator[Chunk]:
        max_new_tokens = request.params.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = self._default_max_new_tokens
        count = min(self._pace.tokens_per_request, max_new_tokens, room)
        finish = FinishReason.STOP if count == self._pace.tokens_per_request else FinishReason.LENGTH
        first_at = time.monotonic() + self._pace.first_token_delay_s
        if count == 0:
            yield Chunk("", 0, prompt_tokens, finish)
            return
        words = self._words(request)
        rate = self._pace.tokens_per_second
        # Deadlines from the start, so the rate does not drift with the time spent yielding.
        period = 1 / rate if rate else 0.0
        for index in range(count):
            if index + 1 == self._pace.fault_at_token:
                self._inject_fault(request)
            wait = first_at + index * period - time.monotonic()
            # Event.wait() takes a lock and a condition even for a zero timeout: only wait for real.
            cancelled = cancel.wait(wait) if wait > 0 else cancel.is_set()
            if cancelled:
                yield Chunk("", index, prompt_tokens, FinishReason.CANCELLED)
                return
            word = words[index % len(words)]
            text = word if index == 0 else " " + word
            yield Chunk(text, index + 1, prompt_tokens, finish if index == count - 1 else None)

    def _words(self, request: ChatRequest) -> tuple[str, ...]:
        if self._pace.echo:
            return tuple(_last_turn(request).split()) or _WORDS
        return _WORDS

    def _inject_fault(self, request: ChatRequest) -> None:
        text = _last_turn(request)
        pace = self._pace
        if pace.fail_marker is not None and pace.fail_marker in text:
            raise EngineError(
                f"injected fault: engine error at token {pace.fault_at_token} "
                f"(the request contains model.paced.fail_marker {pace.fail_marker!r})"
            )
        if pace.hang_marker is not None and pace.hang_marker in text:
            threading.Event().wait()  # nobody will ever set it: a step that never returns


def _last_turn(request: ChatRequest) -> str:
    """The text the answer echoes and faults look at: the last user turn, or the raw prompt."""
    if request.raw_prompt is not None:
        return request.raw_prompt
    return request.history[-1].content if request.history else ""


def estimate_prompt_tokens(request: ChatRequest) -> int:
    if request.raw_prompt is not None:
        return len(request.raw_prompt.encode()) // _BYTES_PER_TOKEN + 1
    texts = [request.system_message, *(turn.content for turn in request.history)]
    return sum(map(_text_tokens, texts))


def _text_tokens(text: str) -> int:
    return len(text.encode()) // _BYTES_PER_TOKEN + _TEMPLATE_TOKENS_PER_TURN
