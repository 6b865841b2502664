"""The interface a worker drives: one generation at a time, streamed as chunks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

from common.config import ModelConfig
from common.devices import DeviceGroup, format_group
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

    def held_prefix(self) -> tuple[int, ...]:
        """Hashes (common/prefix_hash.py) of the conversation prefixes whose keys/values the engine
        holds now, for the router's cache-aware dispatch; () when it holds none."""
        ...


def load_engine(model: ModelConfig, device_id: int | DeviceGroup) -> Engine:
    """The engine `model` configures, on a device or a device group (a bmodel compiled for several
    chips; only the sail engine drives more than one). Backends are imported only when chosen: a
    paced worker needs no numpy model code, and only the sail backend may import sophon.sail."""
    if model.engine == "numpy":
        if not isinstance(device_id, int) and len(device_id) > 1:
            raise ValueError(
                "engine numpy runs a worker on one CPU slot, not on the device group "
                f"{format_group(device_id)} (groups are for sail bmodels compiled for several chips)"
            )
        from worker.core.llm_engine import LLMEngine
        from worker.core.model_files import load_numpy_model
        from worker.core.numpy_graphs import NumpyGraphs

        weights, tokenizer = load_numpy_model(model.path, model.tokenizer)
        seq_len = min(model.context_size, weights.arch.max_positions)
        graphs = NumpyGraphs(weights, seq_len)
        return LLMEngine(graphs, tokenizer, model.name, model.defaults, model.reuse_kv)
    if model.engine == "sail":
        from worker.core.llm_engine import LLMEngine
        from worker.core.sail_history import SailHistoryGraphs
        from worker.core.tokenizer import load_tokenizer

        if model.tokenizer is None:
            raise ValueError(
                "engine sail needs model.tokenizer: a token_config folder (a bmodel has no tokenizer)"
            )
        tokenizer = load_tokenizer(model.tokenizer)
        graphs = SailHistoryGraphs(model.path, device_id)  # SailGraphs + block_kv_{i} when present
        return LLMEngine(graphs, tokenizer, model.name, model.defaults, model.reuse_kv)
    if model.engine == "paced":
        from worker.core.paced import PacedEngine

        return PacedEngine(model)
    raise ValueError(f"unknown engine {model.engine!r} (numpy, sail or paced)")
