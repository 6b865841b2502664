"""LLMEngine: a chat request in, streamed text out, over any ModelGraphs backend.

Renders the model's chat template, fits the prompt into the context (dropping the oldest turns),
merges the request's sampling parameters with the configured defaults, runs the generation driver,
detokenizes without splitting characters and cuts the answer at stop strings.

Multi-turn reuse (model.reuse_kv): the engine remembers what its KV cache holds (kv_prefix.py) and
a prompt that starts with those tokens prefills only the rest; the final chunk of every generation
leaves `held_prefix()` up to date for the worker's report to the router.

Greedy-only bmodels (HeadKind.TOKEN_ID: top-1 compiled into lm_head) cannot sample on the host;
a request that asks for sampling explicitly is refused with RequestError (INVALID_ARGUMENT), and
the configured sampling defaults are not applied to them (they decode greedily).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

from common.config import GenerationDefaults
from common.prefix_hash import conversation_hashes
from worker.core.detokenizer import StreamDecoder
from worker.core.driver import Generation
from worker.core.graphs import HeadKind, ModelGraphs
from worker.core.kv_prefix import KvPrefix, common_prefix
from worker.core.request import (
    ASSISTANT,
    USER,
    ChatRequest,
    Chunk,
    EngineError,
    FinishReason,
    RequestError,
    SamplingParams,
    Turn,
)
from worker.core.sampling import Sampler, SamplingConfig
from worker.core.stop_strings import StopStringFilter
from worker.core.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# A prompt must leave room for at least this many new tokens (or max_new_tokens, if smaller).
MIN_ANSWER_ROOM = 16


@dataclass(frozen=True)
class _Settings:
    max_new_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]


class LLMEngine:
    """The Engine protocol (worker/core/engine.py) for one model; one generation at a time."""

    def __init__(
        self,
        graphs: ModelGraphs,
        tokenizer: Tokenizer,
        model_id: str,
        defaults: GenerationDefaults,
        reuse_kv: bool = True,
    ) -> None:
        self.model_id = model_id
        self.context_size = graphs.spec.seq_len
        self._graphs = graphs
        self._tokenizer = tokenizer
        self._defaults = defaults
        self._greedy_only = graphs.spec.head is HeadKind.TOKEN_ID
        # Without a usable prefill-with-history graph nothing is reused, and nothing is reported.
        self._reuse_kv = reuse_kv and graphs.spec.max_history > 0 and graphs.spec.is_dynamic
        self._kv_prefix = KvPrefix()
        if self._greedy_only:
            log.warning(
                "%s: the bmodel's lm_head returns token ids (greedy decoding compiled in); requests that "
                "ask for sampling (temperature > 0, top_k, top_p, repetition_penalty) will be refused",
                model_id,
            )

    def held_prefix(self) -> tuple[int, ...]:
        """Hashes (common/prefix_hash.py) of the conversation prefixes the KV cache holds (and
        will reuse: none when reuse is off)."""
        return self._kv_prefix.conversation if self._reuse_kv else ()

    def generate(self, request: ChatRequest, cancel: threading.Event) -> Iterator[Chunk]:
        settings = self._settings(request.params)
        prompt_ids, history = self._fit_prompt(request, settings.max_new_tokens)
        cached = self._kv_prefix.shared_with(prompt_ids) if self._reuse_kv else 0
        generation = self._generation(prompt_ids, settings, cancel, cached)
        answer: list[str] = []
        remembered = False
        try:
            for chunk in self._stream(prompt_ids, settings, generation):
                answer.append(chunk.text)
                if chunk.finish_reason is not None:  # the worker reports the cache with this chunk
                    self._remember(generation, request, history, "".join(answer))
                    remembered = True
                yield replace(chunk, cached_prompt_tokens=generation.reused)
        except Exception as error:
            remembered = True
            log.exception("%s: generation failed", self.model_id)
            failure = f"generation failed: {type(error).__name__}: {error}"
            self._reset_after(failure)
            raise EngineError(failure) from error
        finally:
            if not remembered:  # closed early: the caller stopped reading (a cancel)
                self._remember(generation, request, history, "".join(answer))

    def _remember(
        self, generation: Generation, request: ChatRequest, history: tuple[Turn, ...], answer: str
    ) -> None:
        """Record what the cache holds now, and the conversation prefixes that names for the router:
        the request's turns and the answer so far when its prompt was prefilled, else (a cancel
        before the prefill) the prefixes the old and new conversations share. A prompt whose oldest
        turns were dropped to fit the context no longer starts like the conversation, and a raw
        prompt is none: no prefixes (its tokens are still reused by a prompt that starts with them)."""
        hashes: list[int] = []
        if request.raw_prompt is None and len(history) == len(request.history):
            turns = (*history, Turn(ASSISTANT, answer)) if answer else history
            hashes = conversation_hashes(request.system_message, turns)
        if len(generation.computed) < generation.prompt_length:
            hashes = common_prefix(self._kv_prefix.conversation, hashes)
        self._kv_prefix.remember(generation.computed, hashes)

    def _reset_after(self, failure: str) -> None:
        """Forget the KV cache of a failed generation: its last step may have stopped half-way
        through writing it, and nothing of one request may reach the next."""
        self._kv_prefix.forget()
        try:
            self._graphs.reset()
        except Exception as error:
            log.exception("%s: resetting the KV cache failed", self.model_id)
            raise EngineError(
                f"{failure}; resetting the KV cache failed too: {type(error).__name__}: {error}"
            ) from error

    def _generation(
        self, prompt_ids: list[int], settings: _Settings, cancel: threading.Event, cached: int
    ) -> Generation:
        return Generation(
            self._graphs,
            prompt_ids,
            Sampler(settings.sampling),
            settings.max_new_tokens,
            self._tokenizer.eos_token_ids,
            cancel,
            greedy=settings.sampling.is_greedy,
            cached=cached,
        )

    def _stream(self, prompt_ids: list[int], settings: _Settings, generation: Generation) -> Iterator[Chunk]:
        decoder = StreamDecoder(self._tokenizer)
        stops = StopStringFilter(settings.stop)
        prompt_tokens, completion_tokens = len(prompt_ids), 0
        last_text = ""  # the last token's text goes out with the final chunk: token counts grow per frame
        for token in generation:
            completion_tokens += 1
            text = stops.push(decoder.push(token))
            if stops.stopped:
                yield Chunk(text, completion_tokens, prompt_tokens, FinishReason.STOP)
                return
            if generation.finish_reason is not None:
                last_text = text
            elif text:
                yield Chunk(text, completion_tokens, prompt_tokens)
        if generation.finish_reason is FinishReason.STOP:
            completion_tokens += 1  # the end-of-sequence token is generated too (as vLLM counts it)
        text = last_text + stops.push(decoder.flush())
        if stops.stopped:
            yield Chunk(text, completion_tokens, prompt_tokens, FinishReason.STOP)
            return
        yield Chunk(text + stops.flush(), completion_tokens, prompt_tokens, generation.finish_reason)

    def _settings(self, params: SamplingParams) -> _Settings:
        defaults = self._defaults
        if self._greedy_only:
            self._refuse_sampling(params)
            base = SamplingConfig()  # neutral: the configured sampling defaults cannot apply
        else:
            base = SamplingConfig(
                defaults.temperature, defaults.top_k, defaults.top_p, defaults.repetition_penalty
            )
        max_new_tokens = _chosen(params.max_new_tokens, defaults.max_new_tokens)
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        try:
            sampling = SamplingConfig(
                temperature=_chosen(params.temperature, base.temperature),
                top_k=_chosen(params.top_k, base.top_k),
                top_p=_chosen(params.top_p, base.top_p),
                repetition_penalty=_chosen(params.repetition_penalty, base.repetition_penalty),
                penalty_window=defaults.penalty_window,
                seed=_chosen(params.seed, defaults.seed),
            )
        except ValueError as error:
            raise RequestError(f"invalid sampling parameter: {error}") from None
        return _Settings(max_new_tokens, sampling, tuple(params.stop))

    def _refuse_sampling(self, params: SamplingParams) -> None:
        asked = {
            "temperature": params.temperature is not None and params.temperature > 0,
            "top_k": params.top_k not in (None, 0, 1),
            "top_p": params.top_p not in (None, 1.0),
            "repetition_penalty": params.repetition_penalty not in (None, 1.0),
        }
        if any(asked.values()):
            names = ", ".join(name for name, set_ in asked.items() if set_)
            raise RequestError(
                f"model {self.model_id} has greedy decoding compiled into its bmodel (lm_head returns token "
                f"ids), so sampling cannot be applied: remove {names} from the request or use temperature 0"
            )

    def _fit_prompt(self, request: ChatRequest, max_new_tokens: int) -> tuple[list[int], tuple[Turn, ...]]:
        """The prompt's token ids and the turns they hold, dropping the oldest turns until it
        leaves room for an answer."""
        if request.raw_prompt is not None:
            return self._raw_prompt(request.raw_prompt, max_new_tokens), request.history
        history = request.history
        if not history or history[-1].role != USER:
            raise RequestError("the conversation must end with a user turn")
        room = min(MIN_ANSWER_ROOM, max_new_tokens)
        longest = self._graphs.spec.prefill_length  # a prompt is prefilled in one pass
        while True:
            prompt_ids = self._encode(request.system_message, history)
            if len(prompt_ids) + room <= self.context_size and len(prompt_ids) <= longest:
                if len(history) < len(request.history):
                    log.info(
                        "%s: dropped %d oldest turns to fit the context",
                        self.model_id,
                        len(request.history) - len(history),
                    )
                return prompt_ids, history
            if len(history) == 1:
                raise RequestError(
                    f"the prompt needs {len(prompt_ids)} tokens even with only the system message and "
                    f"the last user turn; with room for {room} new tokens that exceeds the model's "
                    f"context of {self.context_size} tokens"
                    + (f" (or its longest prompt, {longest} tokens)" if longest < self.context_size else "")
                )
            history = _without_oldest_turn(history)

    def _raw_prompt(self, text: str, max_new_tokens: int) -> list[int]:
        """A raw prompt is continued as it is: nothing can be dropped to make it fit."""
        prompt_ids = self._tokenizer.encode_prompt(text)
        room = min(MIN_ANSWER_ROOM, max_new_tokens)
        if len(prompt_ids) + room > self.context_size:
            raise RequestError(
                f"the prompt needs {len(prompt_ids)} tokens; with room for {room} new tokens that "
                f"exceeds the model's context of {self.context_size} tokens"
            )
        return prompt_ids

    def _encode(self, system_message: str, history: tuple[Turn, ...]) -> list[int]:
        text = self._tokenizer.chat_template.render(system_message, history)
        return self._tokenizer.encode_prompt(text)


def _chosen(requested: _T | None, default: _T) -> _T:
    return default if requested is None else requested


def _without_oldest_turn(history: tuple[Turn, ...]) -> tuple[Turn, ...]:
    """Drop the oldest turn, and an assistant turn left first by it, so history starts with the user."""
    history = history[1:]
    while len(history) > 1 and history[0].role == ASSISTANT:
        history = history[1:]
    return history
