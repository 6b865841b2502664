"""One call, from either front, as the router's logs and metrics see it: its request id, its
outcome, its log line.

The request id is the client's `x-request-id` metadata value when it sends one (1 to
MAX_REQUEST_ID_CHARS printable ASCII characters, no spaces; any other value is refused with
INVALID_ARGUMENT), else a new random id. The scheduler keeps ids unique among open calls (a
second open call with the same id gets a suffix). The id goes to the worker in the Generate, so
the worker's log lines carry it too, and back to the client in the initial metadata `x-request-id`.

At its end every call, admitted or refused, is counted in the metrics and logged in one line
that names its front (grpc or http) and method:

    request 4f1c2a9e0b7d3c65: grpc StreamComplete OK, finish stop, worker w1; queue 0.002 s,
    first token 0.705 s, total 6.981 s; prompt 23 tokens, 64 tokens; 20 prompt tokens from the KV cache

The HTTP front (router/http/) names its outcomes with the same status names (its table maps them
to HTTP codes), and logs one line per generation: a request with n choices is n calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from router.job import Job
    from router.metrics import PoolMetrics

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
GRPC_FRONT = "grpc"


class Call:
    __slots__ = ("ended_at", "front", "job", "method", "request_id", "request_id_problem", "started_at")

    def __init__(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None, front: str = GRPC_FRONT
    ) -> None:
        self.front = front
        self.method = method
        self.started_at = time.monotonic()
        self.ended_at = 0.0
        self.job: Job | None = None  # set once the scheduler accepted the request
        self.request_id, self.request_id_problem = _request_id(metadata or ())

    def admitted(self, job: Job) -> None:
        self.job = job
        self.request_id = job.request_id  # made unique by the scheduler

    def response_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_KEY, self.request_id),)


@contextlib.contextmanager
def observed_call(method: str, context: grpc.aio.ServicerContext, metrics: PoolMetrics) -> Iterator[Call]:
    """Wrap a call's handler: at its end, however it ends, count it and log its line."""
    call = Call(method, context.invocation_metadata())
    error: BaseException | None = None
    try:
        yield call
    except BaseException as raised:
        error = raised
        raise
    finally:
        end_call(call, _status(context, error), metrics)


def end_call(call: Call, code: grpc.StatusCode, metrics: PoolMetrics) -> None:
    """Count the call in the metrics and write its log line (once, when it ended with `code`)."""
    call.ended_at = time.monotonic()
    metrics.on_call_end(call, code)
    _log_end(call, code)


def _request_id(metadata: Sequence[tuple[str, str | bytes]]) -> tuple[str, str]:
    """(the request id, "") or, when the client's x-request-id is unusable, (a new id, the problem)."""
    sent = next((value for key, value in metadata if key == REQUEST_ID_KEY), None)
    if sent is None:
        return secrets.token_hex(8), ""
    if (
        isinstance(sent, str)
        and 0 < len(sent) <= MAX_REQUEST_ID_CHARS
        and all("!" <= char <= "~" for char in sent)
    ):
        return sent, ""
    shown = sent if len(sent) <= 40 else f"{sent[:40]}..."
    return secrets.token_hex(8), (
        f"the {REQUEST_ID_KEY} metadata must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII "
        f"characters without spaces, got {shown!r} ({len(sent)} characters)"
    )


def _status(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the client gets, from how the handler ended."""
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(error, asyncio.CancelledError | GeneratorExit):  # the call was cut: client or deadline
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # a bug in the handler: grpc answers UNKNOWN


def _log_end(call: Call, code: grpc.StatusCode) -> None:
    total_s = call.ended_at - call.started_at
    job = call.job
    if job is None:
        log.info(
            "request %s: %s %s %s, not admitted; total %.3f s",
            call.request_id,
            call.front,
            call.method,
            code.name,
            total_s,
        )
        return
    timings = job.timings
    first_token_s = timings.time_to_first_token()
    log.info(
        "request %s: %s %s %s%s, finish %s, worker %s; queue %.3f s, first token %s, total %.3f s; "
        "prompt %d tokens, %d tokens; %d prompt tokens from the KV cache",
        call.request_id,
        call.front,
        call.method,
        code.name,
        "" if job.model is None else f", model {job.model}",
        timings.finish_name,
        job.worker.worker_id if job.worker is not None else "-",
        timings.queue_wait(call.ended_at),
        "-" if first_token_s is None else f"{first_token_s:.3f} s",
        total_s,
        timings.prompt_tokens,
        timings.completion_tokens,
        timings.cached_prompt_tokens,
    )
