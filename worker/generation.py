"""Generation off the socket loop: one thread runs the engine, one request at a time.

The socket loop must keep heartbeating and reading Cancel while a step runs, so the engine runs
here. Each wire chunk goes to a callback as soon as it is made: the WorkerService sends it under
the lock it shares with the socket loop (pyzmq sockets are not thread-safe), never while the
engine is inside a step.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

from protos import worker_pb2 as pb
from worker.core.engine import Engine
from worker.core.request import ChatRequest, EngineError, RequestError
from worker.translate import cancelled_chunk, error_chunk, wire_chunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    request_id: str
    request: ChatRequest
    cancel: threading.Event


class GenerationThread:
    def __init__(self, engine: Engine, deliver: Callable[[pb.Chunk], None]) -> None:
        self._engine = engine
        self._deliver = deliver
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        # A daemon: a step that never returns must not keep a stopping process alive.
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def stop(self, timeout: float) -> None:
        """Ask the thread to end after its current job and wait for it up to `timeout`."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            for chunk in stream(self._engine, job):
                self._deliver(chunk)


def stream(engine: Engine, job: Job) -> Iterator[pb.Chunk]:
    """The wire chunks of one generation, always ending with exactly one final chunk, which reports
    the conversation prefixes the engine's KV cache holds once it is done."""
    for chunk in _chunks(engine, job):
        if chunk.finish_reason != pb.FINISH_NONE or chunk.error_kind != pb.ERROR_NONE:
            chunk.held_prefix.extend(engine.held_prefix())
        yield chunk


def _chunks(engine: Engine, job: Job) -> Iterator[pb.Chunk]:
    completion_tokens = prompt_tokens = 0
    try:
        chunks = engine.generate(job.request, job.cancel)
        for chunk in chunks:
            completion_tokens, prompt_tokens = chunk.completion_tokens, chunk.prompt_tokens
            if chunk.finish_reason is not None:
                _close(chunks)  # let the engine finish its bookkeeping before the report
                yield wire_chunk(job.request_id, chunk)
                return
            yield wire_chunk(job.request_id, chunk)
            if job.cancel.is_set():  # an engine slower to notice: stop it here, within one token
                _close(chunks)
                yield cancelled_chunk(job.request_id, completion_tokens, prompt_tokens)
                return
        message = "the engine ended without a finish reason"
        yield error_chunk(job.request_id, pb.ERROR_ENGINE, message, completion_tokens, prompt_tokens)
    except RequestError as error:
        yield error_chunk(
            job.request_id, pb.ERROR_INVALID_REQUEST, str(error), completion_tokens, prompt_tokens
        )
    except Exception as error:  # any engine failure ends this request only; the engine goes on
        log.exception("request %s: engine failed", job.request_id)
        message = str(error) if isinstance(error, EngineError) else f"{type(error).__name__}: {error}"
        yield error_chunk(job.request_id, pb.ERROR_ENGINE, message, completion_tokens, prompt_tokens)


def _close(chunks: Iterator[object]) -> None:
    if isinstance(chunks, Generator):
        chunks.close()
