"""The public InferenceService: StreamComplete and Complete on top of the scheduler.

What a client gets, case by case (StreamComplete and Complete alike unless said):

- invalid request (the router's checks), or an unusable x-request-id or x-session-id metadata value:
  INVALID_ARGUMENT, the message names the problem
- router draining: UNAVAILABLE
- a model (field `model` or metadata `x-model`) the pool does not serve: NOT_FOUND, listing the
  served ones (router/models.py); a field and metadata that disagree: INVALID_ARGUMENT
- queue full: RESOURCE_EXHAUSTED
- no worker free before queue_timeout_s or the call's deadline: DEADLINE_EXCEEDED
- the worker refuses the request (ERROR_INVALID_REQUEST): INVALID_ARGUMENT, the worker's message
- engine error (ERROR_ENGINE) before any frame was sent: INTERNAL, the worker's message
- engine error after frames were sent (streams only: Complete sends nothing before the end):
  the text still pending, then a last frame with finished = true, finish_reason = ERROR and
  output_text = the worker's message; the call ends with status OK
- worker lost before anything was sent: the request runs again on another worker, once, and
  the client does not notice
- worker lost after frames were sent, or lost a second time: UNAVAILABLE, the message names the
  worker and the cause

The rule behind it: a client that has received nothing gets a status; a stream already under way
ends in band, so the client keeps the text it has and reads why it stopped, unless the worker
vanished (then the stream is cut: UNAVAILABLE). An error a worker reports with
ERROR_INVALID_REQUEST after frames were sent is treated as an engine error.

Streamed frames: token_usage grows strictly from frame to frame (the worker sends the last token's
text with its final chunk and counts the end-of-sequence token; only a final ERROR frame, or the
end of a cancelled generation, may repeat the count); create_time is the worker's clock when
the oldest text in the frame was made (the router's clock if the worker did not stamp it), so a
client on the same host can measure the router's added latency. Complete answers with one
Completion holding the whole text, the final counts, finished = true and create_time = when the
answer was complete.

Every call, admitted or refused, has a request id (router/calls.py): the client's x-request-id or
a new one. It is sent back in the initial metadata `x-request-id`, travels to the worker, and
names the call in the one log line written at its end.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc

from protos import inference_pb2, inference_pb2_grpc, worker_pb2
from router.cache_policy import session_id
from router.calls import Call, observed_call
from router.job import Job, JobFailed, Update
from router.metrics import PoolMetrics
from router.models import ConflictingModel, ServedModels, UnknownModel
from router.scheduler import QueueFull, Scheduler
from router.validation import RequestLimits, UnreadableRequest, ValidationError, validate

NANOS_PER_SECOND = 1_000_000_000
_FINISH_REASONS = {
    worker_pb2.FINISH_NONE: inference_pb2.UNKNOWN,
    worker_pb2.FINISH_STOP: inference_pb2.STOP,
    worker_pb2.FINISH_LENGTH: inference_pb2.LENGTH,
    worker_pb2.FINISH_ERROR: inference_pb2.ERROR,
}


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        scheduler: Scheduler,
        limits: RequestLimits,
        is_draining: Callable[[], bool],
        metrics: PoolMetrics,
        models: ServedModels,
    ) -> None:
        self._models = models
        self._scheduler = scheduler
        self._limits = limits
        self._is_draining = is_draining
        self._metrics = metrics

    async def StreamComplete(
        self, request: inference_pb2.CompletionRequest | UnreadableRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.Completion]:
        with observed_call("StreamComplete", context, self._metrics) as call:
            job = await self._admit(request, context, call)
            try:
                await context.send_initial_metadata(call.response_metadata())
                frames_sent = 0
                while True:
                    update = await _next_update(job, context)
                    if update.error_kind != worker_pb2.ERROR_NONE:
                        if frames_sent == 0:
                            await context.abort(_error_status(update), update.error_message)
                        if update.text:
                            yield _completion(job, update, final=False)
                        yield _error_completion(job, update)
                        return
                    yield _completion(job, update, final=update.final)
                    frames_sent += 1
                    if update.final:
                        return
            finally:
                self._scheduler.close(job)

    async def Complete(
        self, request: inference_pb2.CompletionRequest | UnreadableRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.Completion:
        with observed_call("Complete", context, self._metrics) as call:
            job = await self._admit(request, context, call)
            try:
                await context.send_initial_metadata(call.response_metadata())
                try:
                    update = await job.result()
                except JobFailed as failure:
                    await context.abort(failure.code, failure.message)
                if update.error_kind != worker_pb2.ERROR_NONE:
                    await context.abort(_error_status(update), update.error_message)
                completion = _completion(job, update, final=True)
                completion.create_time.FromNanoseconds(time.time_ns())
                return completion
            finally:
                self._scheduler.close(job)

    async def _admit(
        self,
        request: inference_pb2.CompletionRequest | UnreadableRequest,
        context: grpc.aio.ServicerContext,
        call: Call,
    ) -> Job:
        """The accepted job; a refused call ends here with its status (and its request id sent)."""
        if self._is_draining():
            await _refuse(
                context,
                call,
                grpc.StatusCode.UNAVAILABLE,
                "the router is shutting down (draining): retry elsewhere or later",
            )
        if call.request_id_problem:
            await _refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, call.request_id_problem)
        try:
            generate = validate(request, self._limits)
        except ValidationError as error:
            await _refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        generate.session_id, session_problem = session_id(context.invocation_metadata() or ())
        if session_problem:
            await _refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, session_problem)
        try:
            field = request.model if request.HasField("model") else None
            model = self._models.resolve(field, context.invocation_metadata())
        except UnknownModel as error:
            await _refuse(context, call, grpc.StatusCode.NOT_FOUND, str(error))
        except ConflictingModel as error:
            await _refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        try:
            job = self._scheduler.submit(generate, context.time_remaining(), call.request_id, model)
        except QueueFull as error:
            await _refuse(context, call, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        call.admitted(job)
        return job


async def _refuse(
    context: grpc.aio.ServicerContext, call: Call, code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.send_initial_metadata(call.response_metadata())
    # In the trailers too: a grpc.aio client that gets the status right behind the initial metadata
    # may drop the latter (seen on a loaded machine), and a refused client needs the id most.
    await context.abort(code, message, trailing_metadata=call.response_metadata())


async def _next_update(job: Job, context: grpc.aio.ServicerContext) -> Update:
    try:
        return await job.next_update()
    except JobFailed as failure:
        await context.abort(failure.code, failure.message)


def _error_status(update: Update) -> grpc.StatusCode:
    if update.error_kind == worker_pb2.ERROR_INVALID_REQUEST:
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def _completion(job: Job, update: Update, *, final: bool) -> inference_pb2.Completion:
    worker = job.worker
    completion = inference_pb2.Completion(
        model_id=worker.model_id,
        output_text=update.text,
        token_usage=update.completion_tokens,
        finished=final,
        finish_reason=_FINISH_REASONS[update.finish_reason] if final else inference_pb2.UNKNOWN,
        prompt_tokens=update.prompt_tokens,
        worker_id=worker.worker_id,
    )
    # As Timestamp.FromNanoseconds does, without its Python-level call per frame.
    created = completion.create_time
    created.seconds, created.nanos = divmod(update.created_unix_nanos or time.time_ns(), NANOS_PER_SECOND)
    return completion


def _error_completion(job: Job, update: Update) -> inference_pb2.Completion:
    completion = _completion(job, update, final=True)
    completion.output_text = update.error_message
    completion.finish_reason = inference_pb2.ERROR
    return completion
