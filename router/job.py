"""One accepted request: where it is (queued, on a worker, done) and the output waiting for its client.

Worker chunks are not buffered one by one. They are appended to a list of text parts and the
latest counts overwrite the previous ones; the client's coroutine takes everything that piled up
since its last read as one update. A client that keeps up gets one frame per chunk; a client that
lags gets fewer, larger frames, and the router holds at most the text of one answer per request.
A streamed update holds at most MAX_UPDATE_CHARS of text (cut between chunks), so a frame stays
well under gRPC's default 4 MiB receive limit of the client however far behind it is.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, NamedTuple

import grpc

from protos import worker_pb2
from router.metrics import RequestTimings

if TYPE_CHECKING:
    from router.workers import WorkerRecord

MAX_UPDATE_CHARS = 1 << 19  # at most 2 MiB of UTF-8


class Update(NamedTuple):
    """The output that piled up since the client's previous read (a tuple: one is made per frame, and a
    frozen dataclass costs four times as much to build)."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    created_unix_nanos: int  # worker time of the oldest chunk in this update, 0 if it did not say
    finish_reason: int  # worker_pb2.FinishReason; FINISH_NONE while the generation runs
    error_kind: int  # worker_pb2.ErrorKind
    error_message: str

    @property
    def final(self) -> bool:
        return self.finish_reason != worker_pb2.FINISH_NONE


class JobFailed(Exception):
    """The router ended the request (queue timeout, lost worker, shutdown): a gRPC status for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Job:
    __slots__ = (
        "_created_unix_nanos",
        "_error_kind",
        "_error_message",
        "_failure",
        "_finish_reason",
        "_loop",
        "_part_tokens",
        "_parts",
        "_pending_chars",
        "_prompt_tokens",
        "_tokens",
        "_tokens_taken",
        "_waiter",
        "abandoned",
        "attempts",
        "delivered",
        "generate",
        "model",
        "request_id",
        "timer",
        "timings",
        "worker",
    )

    def __init__(self, request_id: str, generate: worker_pb2.Generate, model: str | None = None) -> None:
        self.request_id = request_id
        self.generate = generate
        self.model = model  # which model's workers may run it; None = any
        self.worker: WorkerRecord | None = None  # the worker serving it, or that served it last
        self.attempts = 0  # dispatches so far
        self.delivered = False  # the client has been handed output: it can no longer be re-run
        self.abandoned = False  # the client went away; the worker is being told to stop
        self.timer: asyncio.TimerHandle | None = None  # queue deadline or cancel confirmation
        self.timings = RequestTimings()  # for the metrics and the completion log line
        self._loop = asyncio.get_running_loop()  # jobs are made on the event loop, and wait on it
        self._waiter: asyncio.Future[None] | None = None
        self._failure: JobFailed | None = None
        self._reset_output()

    @property
    def done(self) -> bool:
        """The generation is over: a final chunk arrived or the router failed the job."""
        return self._failure is not None or self._finish_reason != worker_pb2.FINISH_NONE

    def push(self, chunk: worker_pb2.Chunk) -> None:
        """Add a worker chunk to the pending output (the caller checked it belongs here)."""
        text = chunk.text
        if text:
            self._parts.append(text)
            self._part_tokens.append(chunk.completion_tokens)
            self._pending_chars += len(text)
        self._tokens = chunk.completion_tokens
        self._prompt_tokens = chunk.prompt_tokens
        if not self._created_unix_nanos:
            self._created_unix_nanos = chunk.created_unix_nanos
        if chunk.error_kind != worker_pb2.ERROR_NONE or chunk.finish_reason == worker_pb2.FINISH_ERROR:
            self._finish_reason = worker_pb2.FINISH_ERROR
            self._error_kind = chunk.error_kind or worker_pb2.ERROR_ENGINE
            self._error_message = chunk.error_message or "the engine failed without a message"
        else:
            self._finish_reason = chunk.finish_reason
        if self._waiter is not None and self._ready_for_stream():
            self._wake()

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        """End the job with a status for the client; output not yet taken is discarded."""
        if not self.done:
            self._failure = JobFailed(code, message)
            self._wake()

    def restart(self) -> None:
        """Forget the output of a lost worker before the job runs again (only while nothing was delivered)."""
        assert not self.delivered, "a job whose output reached the client cannot be re-run"
        self._reset_output()

    async def next_update(self) -> Update:
        """Wait for new output for a streaming client; raises JobFailed when the router ended the job.

        A non-final update is ready only once the token count has grown past the last update's,
        so that token_usage is strictly increasing from frame to frame.
        """
        while not self._ready_for_stream():
            await self._wait()
        self.delivered = True
        if self._pending_chars > MAX_UPDATE_CHARS and self._failure is None:
            head = self._take_head()
            if head is not None:
                return head
        return self._take()

    async def result(self) -> Update:
        """Wait for the end of the generation and return the whole output as one update."""
        while not self.done:
            await self._wait()
        return self._take()

    def _ready_for_stream(self) -> bool:
        return self.done or self._tokens > self._tokens_taken

    def _take_head(self) -> Update | None:
        """The oldest pending chunks, up to MAX_UPDATE_CHARS (at least one, and at least one new
        token), as a non-final update; None if that would take everything anyway."""
        parts, part_tokens = self._parts, self._part_tokens
        count = size = 0
        while count < len(parts):
            if (
                size + len(parts[count]) > MAX_UPDATE_CHARS
                and count
                and part_tokens[count - 1] > self._tokens_taken
            ):
                break
            size += len(parts[count])
            count += 1
        if count == len(parts):
            return None
        text = "".join(parts[:count])
        tokens = part_tokens[count - 1]
        del parts[:count], part_tokens[:count]
        self._pending_chars -= size
        update = Update(
            text,
            tokens,
            self._prompt_tokens,
            self._created_unix_nanos,
            worker_pb2.FINISH_NONE,
            worker_pb2.ERROR_NONE,
            "",
        )
        self._tokens_taken = tokens
        self._created_unix_nanos = 0  # the rest is newer, but when exactly is not kept per chunk
        return update

    def _take(self) -> Update:
        if self._failure is not None:
            raise self._failure
        parts = self._parts
        text = parts[0] if len(parts) == 1 else "".join(parts)
        parts.clear()
        self._part_tokens.clear()
        self._pending_chars = 0
        update = Update(
            text,
            self._tokens,
            self._prompt_tokens,
            self._created_unix_nanos,
            self._finish_reason,
            self._error_kind,
            self._error_message,
        )
        self._tokens_taken = self._tokens
        self._created_unix_nanos = 0
        return update

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _reset_output(self) -> None:
        self._parts: list[str] = []
        self._part_tokens: list[int] = []  # completion_tokens after each part
        self._pending_chars = 0
        self._tokens = 0
        self._tokens_taken = 0
        self._prompt_tokens = 0
        self._created_unix_nanos = 0
        self._finish_reason = worker_pb2.FINISH_NONE
        self._error_kind = worker_pb2.ERROR_NONE
        self._error_message = ""
