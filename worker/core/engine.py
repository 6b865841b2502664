"""The interface a worker drives: one generation at a time, streamed as chunks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

from worker.core.request import ChatRequest, Chunk


class Engine(Protocol):
    model_id: str
    context_size: int  # tokens: prompt + answer

    def generate(self, request: ChatRequest, cancel: threading.Event) -> Iterator[Chunk]:
        """Stream the answer. Checks `cancel` between steps (then ends with CANCELLED).

        Raises RequestError before the first chunk when the request cannot be served, and
        EngineError when a step fails; the engine is ready for the next request either way.
        """
        ...
