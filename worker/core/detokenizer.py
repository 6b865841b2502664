"""Streaming detokenization: text pieces that never split a character, for one generation.

Decoding token by token breaks characters that span several byte tokens, and some decoders change
a token's text by what precedes it (SentencePiece drops the leading space of the first token). So
each step decodes a short window, the tokens of the last completed piece (as context) plus those
since, and emits what the new tokens added, holding back a tail that decodes to U+FFFD (incomplete
bytes) until later tokens complete it. Per token that is one decode of a few tokens, not of the answer.

When the generation ends (max_new_tokens, the context, a cancel, an end-of-sequence token) while a
character's bytes are still incomplete, those bytes are dropped, not sent as U+FFFD: the answer
stops before the character it never finished (vLLM's incremental detokenizer holds such a tail
back and never sends it either, vllm/transformers_utils/detokenizer_utils.py). Bytes that are
invalid in the middle of the text, with text after them, still become U+FFFD as a whole decode has it.
"""

from __future__ import annotations

from worker.core.tokenizer import Tokenizer

REPLACEMENT_CHARACTER = "\ufffd"


class StreamDecoder:
    """Concatenating every push() result and flush() gives exactly tokenizer.decode(all pushed ids)
    without its trailing U+FFFD characters (an unfinished character at the end)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._window_start = 0  # the window: ids[window_start:], decoded at every push
        self._context_end = 0  # ids[window_start:context_end] are context, already emitted in full
        self._context_length = 0  # characters the context decodes to
        self._emitted = 0  # characters of the window's text already emitted (context included)
        self._in_byte_run = False  # the last text-bearing token is a byte-fallback token

    def push(self, token_id: int) -> str:
        """The text that became final with `token_id` (often "", never a broken character)."""
        self._ids.append(token_id)
        if token_id in self._tokenizer.byte_token_ids:
            self._in_byte_run = True
        elif token_id not in self._tokenizer.special_token_ids:
            self._in_byte_run = False
        if self._in_byte_run:
            return ""  # the whole run decodes as one unit: wait for its end
        text = self._tokenizer.decode(self._ids[self._window_start :])
        stable = text.rstrip(REPLACEMENT_CHARACTER)
        piece = stable[self._emitted :]
        self._emitted = max(self._emitted, len(stable))
        # Slide only once the new tokens produced text: a window starting at, say, a lone special
        # token would lose the leading space a SentencePiece decoder strips from its first word.
        if len(stable) == len(text) and len(text) > self._context_length:
            self._slide()
        return piece

    def flush(self) -> str:
        """Whatever is still held back, at the end of the generation, less an unfinished character."""
        text = self._tokenizer.decode(self._ids[self._window_start :]).rstrip(REPLACEMENT_CHARACTER)
        piece = text[self._emitted :]
        self._emitted = max(self._emitted, len(text))
        return piece

    def _slide(self) -> None:
        """Everything decoded is emitted: the tokens since the context become the next context."""
        self._window_start, self._context_end = self._context_end, len(self._ids)
        self._context_length = len(self._tokenizer.decode(self._ids[self._window_start : self._context_end]))
        self._emitted = self._context_length
