"""Cutting a text stream at the first stop string, never emitting any part of the stop string.

Text that could be the beginning of a stop string is held back until the next piece decides it.
Nothing already emitted can be part of a stop string: any emitted suffix was checked not to start one.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStringFilter:
    def __init__(self, stop_strings: Iterable[str]) -> None:
        self._stops = tuple(stop for stop in stop_strings if stop)
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Feed newly decoded text; returns what may be emitted now. After a stop string is found
        `stopped` is True and the returned text is everything before it."""
        if self.stopped:
            raise RuntimeError("push after the stop string was found")
        self._pending += text
        found = [index for index in map(self._pending.find, self._stops) if index >= 0]
        if found:
            self.stopped = True
            emitted, self._pending = self._pending[: min(found)], ""
            return emitted
        keep = self._longest_stop_prefix_suffix()
        emitted = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(emitted) :]
        return emitted

    def flush(self) -> str:
        """The held-back text, at the end of a generation that was not stopped by a stop string."""
        emitted, self._pending = self._pending, ""
        return emitted

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest end of the pending text that is a proper start of a stop string."""
        pending = self._pending
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest
