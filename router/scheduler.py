"""Queueing and dispatch: which request runs on which worker, and what happens when things go wrong.

- A FIFO queue per model, bounded together; a request arriving when they are full fails with
  RESOURCE_EXHAUSTED.
- Dispatch runs whenever a request arrives, a worker registers or a worker finishes: the head of
  each model's queue goes to the least recently used idle worker of that model, until one of the
  two runs out. So no worker idles while a request for its model waits, and a worker runs one
  request at a time. A request submitted without a model (model None: a router with no configured
  models) goes to any worker.
- A request that waits longer than queue_timeout_s, or than its gRPC deadline, fails with
  DEADLINE_EXCEEDED and never reaches a worker.
- A chunk is relayed only if it belongs to the request its worker is running; anything else
  (stale, unknown, another worker's) is logged and dropped.
- When the client goes away the worker gets a Cancel and stays busy until it confirms with a
  final chunk; a worker that does not confirm within the liveness window is dropped as lost.
- A request on a lost worker (or one the worker cancelled on its own) whose client has been
  handed nothing yet is run again, once, ahead of the queue; otherwise it fails with UNAVAILABLE
  and a message naming the worker and the cause.

All counts the snapshot and the metrics' gauges report are kept here and in the registry; request
timings go to router/metrics.py through one-line hooks.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass

import grpc

from protos import worker_pb2
from router.job import Job
from router.metrics import PoolMetrics
from router.workers import WorkerRecord, WorkerRegistry

log = logging.getLogger(__name__)

# A request runs on at most this many workers: the first and one re-dispatch after a lost worker.
MAX_ATTEMPTS = 2
# A request that would wait past its call's deadline fails this share of the time left earlier (at
# most the cap): the router's status, which says why, must reach the client before the client's own
# deadline ends the call with a bare "Deadline Exceeded".
DEADLINE_HEADROOM = 0.1
DEADLINE_HEADROOM_MAX_S = 0.5


class QueueFull(Exception):
    """The queue is at its bound: the caller answers RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class Snapshot:
    """Internal counts at one moment, for tests and metrics."""

    queued: int  # accepted, waiting for a worker
    running: int  # on a worker, including those whose cancel is not confirmed yet
    open_calls: int  # accepted calls whose client side has not ended
    workers_idle: int
    workers_busy: int
    workers_lost: int


class Scheduler:
    def __init__(
        self, registry: WorkerRegistry, queue_size: int, queue_timeout_s: float, metrics: PoolMetrics
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._queue_size = queue_size
        self._queue_timeout_s = queue_timeout_s
        self._queues: dict[str | None, OrderedDict[str, Job]] = {}  # by model; only non-empty ones
        self._queued = 0
        self._running: dict[bytes, Job] = {}  # by worker identity
        self._open: dict[str, Job] = {}
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        registry.set_listener(self)

    def snapshot(self) -> Snapshot:
        registry = self._registry
        return Snapshot(
            queued=self._queued,
            running=len(self._running),
            open_calls=len(self._open),
            workers_idle=registry.idle_count,
            workers_busy=registry.ready_count - registry.idle_count,
            workers_lost=registry.lost_count,
        )

    # -- the client side -------------------------------------------------------------------------

    def queued_by_model(self) -> dict[str | None, int]:
        return {model: len(queue) for model, queue in self._queues.items()}

    def running_on(self, worker: WorkerRecord) -> Job | None:
        return self._running.get(worker.identity)

    def submit(
        self,
        generate: worker_pb2.Generate,
        grpc_time_left_s: float | None,
        request_id: str,
        model: str | None = None,
    ) -> Job:
        """Accept a validated request for `model` (raises QueueFull) and dispatch it if a worker of that
        model is idle. The caller checked that the model is served.

        The job's request id is `request_id`, with a suffix if another open call has it already.
        """
        if self._queued >= self._queue_size:
            raise QueueFull(
                f"the queue is full ({self._queue_size} requests waiting for a worker): retry later"
            )
        job = Job(self._unused_request_id(request_id), generate, model)
        generate.request_id = job.request_id
        self._open[job.request_id] = job
        self._all_closed.clear()
        self._enqueue(job, grpc_time_left_s)
        self._dispatch()
        return job

    def close(self, job: Job) -> None:
        """The client side of a call ended (answered, failed, cancelled or disconnected)."""
        self._open.pop(job.request_id, None)
        if not self._open:
            self._all_closed.set()
        if self._unqueue(job):
            _cancel_timer(job)
            job.fail(grpc.StatusCode.CANCELLED, "the client went away")
        elif job.worker is not None and self._running.get(job.worker.identity) is job:
            job.abandoned = True
            self._cancel_on_worker(job, job.worker)

    async def wait_all_closed(self) -> None:
        await self._all_closed.wait()

    def fail_all(self, code: grpc.StatusCode, message: str) -> None:
        """End every open call with a status (used when a drain times out)."""
        for job in list(self._open.values()):
            job.fail(code, message)

    # -- the worker side (RegistryListener) -------------------------------------------------------

    def worker_ready(self, worker: WorkerRecord) -> None:
        self._dispatch()

    def worker_lost(self, worker: WorkerRecord, cause: str) -> None:
        job = self._running.pop(worker.identity, None)
        if job is None:
            return
        _cancel_timer(job)
        if not job.abandoned:
            self._recover(job, f"worker {worker.worker_id} was lost ({cause})")
        self._dispatch()

    def chunk(self, worker: WorkerRecord, chunk: worker_pb2.Chunk) -> None:
        job = self._running.get(worker.identity)
        if job is None or job.request_id != chunk.request_id:
            log.warning(
                "dropped a chunk for request %r from worker %s: it is running %s",
                chunk.request_id,
                worker.worker_id,
                repr(job.request_id) if job else "nothing",
            )
            return
        final = chunk.finish_reason != worker_pb2.FINISH_NONE or chunk.error_kind != worker_pb2.ERROR_NONE
        if final:
            worker.tokens_served += chunk.completion_tokens
            self._finish_on(worker, job)
        if job.abandoned:
            return
        if chunk.finish_reason == worker_pb2.FINISH_CANCELLED:
            self._recover(job, f"worker {worker.worker_id} cancelled the generation on its own")
            self._dispatch()
            return
        self._metrics.on_chunk(job, chunk)
        job.push(chunk)

    # -- internals -------------------------------------------------------------------------------

    def _unused_request_id(self, wanted: str) -> str:
        request_id = wanted
        while request_id in self._open:
            request_id = f"{wanted}-{secrets.token_hex(2)}"
        return request_id

    def _enqueue(self, job: Job, grpc_time_left_s: float | None, *, front: bool = False) -> None:
        queue = self._queues.setdefault(job.model, OrderedDict())
        queue[job.request_id] = job
        self._queued += 1
        self._metrics.on_enqueue(job)
        if front:
            queue.move_to_end(job.request_id, last=False)
        wait_s, reason = self._queue_timeout_s, f"the queue timeout ({self._queue_timeout_s:g} s)"
        if grpc_time_left_s is not None and grpc_time_left_s < wait_s:
            headroom_s = min(grpc_time_left_s * DEADLINE_HEADROOM, DEADLINE_HEADROOM_MAX_S)
            wait_s, reason = grpc_time_left_s - headroom_s, "the call's deadline"
        job.timer = asyncio.get_running_loop().call_later(max(wait_s, 0.0), self._expire, job, reason)

    def _expire(self, job: Job, reason: str) -> None:
        job.timer = None
        if self._unqueue(job):
            job.fail(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no worker became free before {reason}: the request was not started",
            )

    def _unqueue(self, job: Job) -> bool:
        """Take a job out of its queue; False if it was not queued."""
        queue = self._queues.get(job.model)
        if queue is None or queue.pop(job.request_id, None) is None:
            return False
        self._queued -= 1
        if not queue:
            del self._queues[job.model]
        return True

    def _dispatch(self) -> None:
        registry = self._registry
        for model, queue in list(self._queues.items()):
            while queue:
                worker = registry.take_idle(model, next(iter(queue.values())).generate)
                if worker is None:
                    break
                _, job = queue.popitem(last=False)
                self._queued -= 1
                _cancel_timer(job)
                job.worker = worker
                job.attempts += 1
                self._metrics.on_dispatch(job)
                self._running[worker.identity] = job
                registry.send(worker, job.generate)
            if not queue:
                del self._queues[model]

    def _finish_on(self, worker: WorkerRecord, job: Job) -> None:
        """The worker ended its generation: free it for the next request."""
        del self._running[worker.identity]
        worker.requests_served += 1
        _cancel_timer(job)
        self._registry.release(worker)
        self._dispatch()

    def _cancel_on_worker(self, job: Job, worker: WorkerRecord) -> None:
        self._registry.send(worker, worker_pb2.Cancel(request_id=job.request_id))
        limit_s = self._registry.silence_limit_s
        job.timer = asyncio.get_running_loop().call_later(limit_s, self._cancel_overdue, job, worker, limit_s)

    def _cancel_overdue(self, job: Job, worker: WorkerRecord, limit_s: float) -> None:
        job.timer = None
        if self._running.get(worker.identity) is job:
            self._registry.drop(
                worker, f"it did not confirm the cancel of request {job.request_id} in {limit_s:g} s"
            )

    def _recover(self, job: Job, cause: str) -> None:
        """Run the job again if its client has seen nothing and it has a try left; else fail it."""
        if job.done:
            return  # already failed by the router (a drain that timed out)
        if not job.delivered and job.attempts < MAX_ATTEMPTS:
            log.warning("request %s will run again: %s", job.request_id, cause)
            job.restart()
            self._enqueue(job, None, front=True)
        else:
            job.fail(grpc.StatusCode.UNAVAILABLE, f"{cause} while serving this request")


def _cancel_timer(job: Job) -> None:
    if job.timer is not None:
        job.timer.cancel()
        job.timer = None
