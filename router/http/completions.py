"""POST /v1/chat/completions and /v1/completions: admission, then one job per choice, answered whole
or streamed as server-sent events.

Admission refuses in this order, each with its OpenAI error (router/http/errors.py maps outcomes to
statuses): draining 503, an unusable x-request-id 400, a body too large 413 / too slow 408 / not
JSON 400, invalid fields 400 (router/http/openai_requests.py), an unknown model 404, no worker
registered 503, the queue full 429. Then every choice is submitted to the scheduler as its own
request (its own worker, its own log line); the request ids are the call's id, then id-1, id-2 ...

A stream's headers wait for its first event, so a request that fails before producing anything
(queue timeout 504, engine failure 500, the worker refusing the prompt 400, worker lost 503) gets
a plain HTTP error a client can act on. Once streaming, a failure is sent as one
`data: {"error": ...}` event and the stream ends without [DONE] (the SDK raises on it).

A client that disconnects cancels: aiohttp cancels the handler (handler_cancellation) or a write
fails, and closing the jobs tells the workers to stop within one token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import grpc
from aiohttp import web

from protos import worker_pb2
from router.cache_policy import session_id
from router.calls import REQUEST_ID_KEY, Call, end_call
from router.http import openai_requests
from router.http.errors import ApiError
from router.http.front import HTTP_FRONT, Front
from router.http.openai_requests import Endpoint, OpenAIRequest
from router.http.openai_responses import DONE_EVENT, ResponseWriter, sse_event
from router.job import Job, JobFailed, Update
from router.scheduler import QueueFull
from router.validation import RequestLimits

log = logging.getLogger(__name__)

# Headers that keep proxies (nginx, ...) from buffering the stream.
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def complete(request: web.Request, front: Front, endpoint: Endpoint) -> web.StreamResponse:
    first = Call(endpoint.value, _request_id_metadata(request), front=HTTP_FRONT)
    try:
        parsed = await _admissible(request, front, first, endpoint)
        calls = _submit(front, parsed, first)
    except ApiError as error:
        end_call(first, error.outcome, front.metrics)
        return error.response(first.request_id)
    if parsed.user is not None:
        log.info("request %s: user %r", first.request_id, parsed.user)
    return await _Answer(front, parsed, calls).run(request)


def _request_id_metadata(request: web.Request) -> list[tuple[str, str]]:
    sent = request.headers.get(REQUEST_ID_KEY)
    return [] if sent is None else [(REQUEST_ID_KEY, sent)]


async def _admissible(request: web.Request, front: Front, call: Call, endpoint: Endpoint) -> OpenAIRequest:
    if front.is_draining():
        raise ApiError(
            grpc.StatusCode.UNAVAILABLE,
            "the router is shutting down (draining): retry elsewhere or later",
            code="draining",
        )
    if call.request_id_problem:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, call.request_id_problem)
    body = await _json_body(request, front.limits, front.config.body_timeout_s)
    parsed = openai_requests.parse(body, endpoint, front.limits, front.config.max_n)
    served = front.served_models()
    if parsed.model is not None and parsed.model not in served:
        raise ApiError(
            grpc.StatusCode.NOT_FOUND,
            f"the model {parsed.model!r} does not exist here: "
            f"this pool serves {', '.join(map(repr, served))}",
            param="model",
            code="model_not_found",
        )
    if front.registry.ready_count == 0:
        raise ApiError(
            grpc.StatusCode.UNAVAILABLE,
            "no worker is registered: the pool cannot serve right now",
            code="no_worker",
        )
    session, session_problem = session_id(request.headers.items())  # cache-aware dispatch's pin
    if session_problem:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, session_problem)
    for generation in parsed.generations:
        generation.generate.session_id = session
    return parsed


async def _json_body(request: web.Request, limits: RequestLimits, timeout_s: float) -> object:
    limit = limits.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(f"{request.content_length} bytes", limit)
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(f"more than {limit} bytes", limit) from None
    except TimeoutError:
        raise ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body did not arrive within {timeout_s:g} s (http.body_timeout_s)",
            code="body_timeout",
            status=408,
        ) from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"the body is not valid JSON: {error}") from None


def _too_large(size: str, limit: int) -> ApiError:
    """As the gRPC front words it (router/validation.py), for the body as it came."""
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request too large: {size}, the limit is {limit} bytes",
        code="request_too_large",
        status=413,
    )


def _submit(front: Front, parsed: OpenAIRequest, first: Call) -> list[Call]:
    """One admitted call per choice; all or none (a full queue refuses the whole request)."""
    base_id = first.request_id
    model = parsed.model if parsed.model is not None else front.models.default  # None: any worker
    calls: list[Call] = []
    try:
        for index, generation in enumerate(parsed.generations):
            call = first if index == 0 else Call(first.method, None, HTTP_FRONT)
            wanted_id = base_id if index == 0 else f"{base_id}-{index}"  # may exceed a client's limit
            call.admitted(front.scheduler.submit(generation.generate, None, wanted_id, model))
            calls.append(call)
    except QueueFull as error:
        for call in calls:
            front.scheduler.close(call.job)
            if call is not first:
                end_call(call, grpc.StatusCode.RESOURCE_EXHAUSTED, front.metrics)
        raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), code="queue_full") from None
    return calls


class _Answer:
    """The admitted request's answer, from its jobs to the client; ends every call exactly once."""

    def __init__(self, front: Front, parsed: OpenAIRequest, calls: list[Call]) -> None:
        self._front = front
        self._parsed = parsed
        self._calls = calls
        self._jobs: list[Job] = [call.job for call in calls]  # type: ignore[misc]  # all admitted
        model = parsed.model or front.models.default_name or ""
        self._writer = ResponseWriter(parsed.endpoint, calls[0].request_id, model, parsed.include_usage)
        self._headers = {REQUEST_ID_KEY: calls[0].request_id}
        self._stream_response: web.StreamResponse | None = None  # once its headers went out

    async def run(self, request: web.Request) -> web.StreamResponse:
        outcome = grpc.StatusCode.CANCELLED  # unless it ends otherwise: the client went away
        try:
            if self._parsed.stream:
                response, outcome = await self._stream(request)
            else:
                response, outcome = await self._whole()
            return response
        except ConnectionResetError:  # a write found the connection gone: nobody reads what follows
            return self._stream_response or web.Response(status=499)
        except Exception:
            outcome = grpc.StatusCode.UNKNOWN  # a bug: aiohttp answers 500
            raise
        finally:
            for call, job in zip(self._calls, self._jobs, strict=True):
                self._front.scheduler.close(job)
                end_call(call, outcome, self._front.metrics)

    async def _whole(self) -> tuple[web.StreamResponse, grpc.StatusCode]:
        waits = [asyncio.ensure_future(_result(job)) for job in self._jobs]
        try:
            updates = await asyncio.gather(*waits)
        except ApiError as error:  # the first choice that failed fails the request
            return error.response(self._calls[0].request_id), error.outcome
        finally:
            for wait in waits:  # the other choices' waits, when one failed: their jobs are closed
                wait.cancel()
        prompt_tokens, completion_tokens = self._usage(updates)
        body = self._writer.completion(
            [(update.text, update.finish_reason) for update in updates], prompt_tokens, completion_tokens
        )
        return web.json_response(body, headers=self._headers), grpc.StatusCode.OK

    async def _stream(self, request: web.Request) -> tuple[web.StreamResponse, grpc.StatusCode]:
        writer = self._writer
        finals: list[Update | None] = [None] * len(self._jobs)
        async with contextlib.aclosing(_events(self._jobs)) as events:
            async for index, event in events:
                error = _error_of(event)
                response = self._stream_response
                if response is None:
                    if error is not None:  # nothing sent yet: a plain HTTP error
                        return error.response(self._calls[0].request_id), error.outcome
                    response = await self._open_stream(request)
                if isinstance(event, Update) and event.text:
                    await response.write(writer.text_event(index, event.text))
                if error is not None:
                    await response.write(sse_event(error.body()))
                    return response, error.outcome
                if event.final:
                    finals[index] = event
                    await response.write(writer.finish_event(index, event.finish_reason))
        assert response is not None and all(finals), "every choice ends with a final update"
        if self._parsed.include_usage:
            await response.write(writer.usage_event(*self._usage(finals)))  # type: ignore[arg-type]
        await response.write(DONE_EVENT)
        await response.write_eof()
        return response, grpc.StatusCode.OK

    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={**SSE_HEADERS, **self._headers})
        await response.prepare(request)
        self._stream_response = response
        if self._parsed.endpoint is Endpoint.CHAT:
            for index in range(len(self._jobs)):
                await response.write(self._writer.role_event(index))
        return response

    def _usage(self, finals: list[Update]) -> tuple[int, int]:
        generations = self._parsed.generations
        prompt = sum(
            update.prompt_tokens for update, g in zip(finals, generations, strict=True) if g.counts_prompt
        )
        return prompt, sum(update.completion_tokens for update in finals)


async def _result(job: Job) -> Update:
    """A choice's whole output, or ApiError when it failed."""
    try:
        update = await job.result()
    except JobFailed as failure:
        raise ApiError(failure.code, failure.message) from None
    if update.error_kind:
        raise _engine_error(update)
    return update


async def _events(jobs: list[Job]) -> AsyncIterator[tuple[int, Update | JobFailed]]:
    """(choice index, update or failure) as they come, until every choice ended or one failed."""
    if len(jobs) == 1:  # the common case, without a task per choice
        job = jobs[0]
        while True:
            try:
                update = await job.next_update()
            except JobFailed as failure:
                yield 0, failure
                return
            yield 0, update
            if update.final:
                return
    queue: asyncio.Queue[tuple[int, Update | JobFailed]] = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        while True:
            try:
                update = await job.next_update()
            except JobFailed as failure:
                queue.put_nowait((index, failure))
                return
            queue.put_nowait((index, update))
            if update.final:
                return

    tasks = [asyncio.create_task(pump(index, job)) for index, job in enumerate(jobs)]
    try:
        running = len(jobs)
        while running:
            index, event = await queue.get()
            yield index, event
            if isinstance(event, JobFailed):
                return
            if event.final:
                running -= 1
    finally:
        for task in tasks:
            task.cancel()


def _error_of(event: Update | JobFailed) -> ApiError | None:
    if isinstance(event, JobFailed):
        return ApiError(event.code, event.message)
    if event.error_kind:
        return _engine_error(event)
    return None


def _engine_error(update: Update) -> ApiError:
    """An error the worker reported: it refused the request (400) or the engine failed (500)."""
    if update.error_kind == worker_pb2.ERROR_INVALID_REQUEST:
        return ApiError(grpc.StatusCode.INVALID_ARGUMENT, update.error_message)
    return ApiError(grpc.StatusCode.INTERNAL, update.error_message, code="engine_error")
