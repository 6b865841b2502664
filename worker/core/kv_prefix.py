"""What a worker's KV cache holds between requests, so the next turn of a conversation reuses it.

The KV cache outlives a generation: rows 0..len(tokens)-1 hold the keys/values of `tokens` (the
last prompt and the answer tokens actually run through the model). A new prompt keeps the longest
common prefix of its token ids with them and prefills only the rest (driver.Generation `cached`);
rows past that prefix are rewritten before they are read, so nothing of another conversation
reaches a request beyond the prefix they share. `conversation` is the matching report for the
router (common/prefix_hash.py): the hashes of the turn prefixes held.
"""

from __future__ import annotations

from collections.abc import Sequence


class KvPrefix:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.conversation: tuple[int, ...] = ()

    def shared_with(self, prompt_ids: Sequence[int]) -> int:
        """How many leading prompt tokens the cache already holds."""
        count = 0
        for held, wanted in zip(self.tokens, prompt_ids, strict=False):
            if held != wanted:
                break
            count += 1
        return count

    def remember(self, tokens: list[int], conversation: Sequence[int]) -> None:
        self.tokens = tokens
        self.conversation = tuple(conversation)

    def forget(self) -> None:
        """After an engine error or a reset: the cache holds nothing reusable."""
        self.tokens = []
        self.conversation = ()


def common_prefix(first: Sequence[int], second: Sequence[int]) -> list[int]:
    """The leading items two hash chains share."""
    shared = []
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        shared.append(a)
    return shared
