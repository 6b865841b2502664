"""The router's Prometheus metrics: every metric the pool exports is defined here, and nowhere else.

Each RouterServer owns one PoolMetrics with its own CollectorRegistry (several routers in one
process never collide) and serves it over HTTP on router.metrics_listen when that is set. The
router's parts report through one-line hooks (on_chunk, on_dispatch, ...). The hot path, a worker
chunk relayed to its client, costs one clock read and one observation of the inter-token histogram,
a LoopHistogram: a bisect and a list increment, with no lock (prometheus_client's Histogram takes
one per observation, which was a sixth of the router's CPU per chunk). Labelled series are touched
once per call or per worker event. Gauges (queue length, per-worker state) and the LoopHistogram
are read when scraped on the event loop's thread, so they cost nothing between scrapes and never
read state while the loop changes it.

Request timings are kept on each job (RequestTimings) for the metrics and the completion log line.
Time to first token is counted from when the router accepted the request, so it includes the
queue wait. See notes/metrics.md for the list as operators read it.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from protos import worker_pb2

if TYPE_CHECKING:
    from router.calls import Call
    from router.job import Job
    from router.scheduler import Snapshot
    from router.workers import WorkerRecord

NAMESPACE = "bm_pool"
# Bucket bounds in seconds. A BM1684X decodes Qwen-7B at ~9.5 tokens/s (~0.105 s per token) with
# ~0.7 s to first token; the numpy engine and paced workers are faster. The router's queue timeout
# defaults to 60 s.
QUEUE_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
FIRST_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)
INTER_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1)
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# A liveness check (one per heartbeat interval) counts a missed heartbeat when the worker has been
# silent for longer than this many intervals: the slack keeps timer jitter from counting as a miss.
MISSED_HEARTBEAT_AFTER_INTERVALS = 1.5
SCRAPE_TIMEOUT_S = 5.0  # a scrape waits this long for the event loop to read the pool's state
WORKER_STATES = ("idle", "busy", "lost")  # router.workers.WorkerState values
_FINISH_NAMES = {
    value: name.removeprefix("FINISH_").lower() for name, value in worker_pb2.FinishReason.items()
}


@dataclass(slots=True)
class RequestTimings:
    """When things happened to one request (time.monotonic()), and what its generation produced."""

    accepted_at: float = field(default_factory=time.monotonic)
    queued_at: float | None = None  # when it last entered the queue; None while not queued
    queue_wait_s: float = 0.0  # time spent in the queue by earlier dispatches
    first_token_at: float | None = None
    last_token_at: float = 0.0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those the worker kept in its KV cache
    completion_tokens: int = 0
    finish_reason: int = worker_pb2.FINISH_NONE  # FINISH_ERROR for an error chunk

    def queue_wait(self, now: float) -> float:
        """Total time in the queue, up to `now` if it is still waiting."""
        return self.queue_wait_s + (now - self.queued_at if self.queued_at is not None else 0.0)

    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.accepted_at

    @property
    def finish_name(self) -> str:
        """stop, length, error, or none while the generation had not finished."""
        return _FINISH_NAMES[self.finish_reason]


@dataclass(frozen=True)
class _PoolView:
    snapshot: Snapshot
    workers: list[tuple[str, str | int, str, str]]  # worker_id, device_id (a group: "0,1"), model, state
    histograms: list[tuple[list[int], float]]  # LoopHistogram.read() of each, in registration order


class LoopHistogram:
    """An unlabelled histogram observed on the event loop's thread only, hence without a lock.

    observe() counts into the bucket a bisect finds (buckets hold counts, not yet cumulative) and
    adds to the sum; the cumulative buckets Prometheus wants are made at scrape time. The exposition
    is that of a prometheus_client Histogram with the same name and buckets (minus `_created`).
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = f"{NAMESPACE}_{name}"
        self.documentation = documentation
        self._bounds = tuple(float(bound) for bound in buckets)
        self._labels = [floatToGoString(bound) for bound in self._bounds] + ["+Inf"]
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1  # bounds are inclusive ("le")
        self._sum += value

    def read(self) -> tuple[list[int], float]:
        """(counts per bucket, sum): to be called on the event loop's thread, like observe()."""
        return list(self._counts), self._sum

    def family(self, reading: tuple[list[int], float] | None = None) -> HistogramMetricFamily:
        """The metric family, with the samples of `reading` (none: the bare family, for describe)."""
        if reading is None:
            return HistogramMetricFamily(self.name, self.documentation, labels=())
        counts, total = reading
        cumulative = itertools.accumulate(counts)
        return HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=list(zip(self._labels, cumulative, strict=True)),
            sum_value=total,
        )


class PoolMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        metric = {"namespace": NAMESPACE, "registry": self.registry}
        self._requests = Counter(
            "requests",
            "Calls ended, by front (grpc, http), method, status code (gRPC's names; the HTTP front "
            "maps its answers to them), finish reason (none: no finished generation) and model (empty "
            "when not admitted or with no configured model)",
            ("front", "grpc_method", "grpc_code", "finish_reason", "model"),
            **metric,
        )
        self._prompt_tokens = Counter("prompt_tokens", "Prompt tokens of the requests served", **metric)
        self._prompt_tokens_cached = Counter(
            "prompt_tokens_cached",
            "Prompt tokens of the requests served that the worker kept in its KV cache (not prefilled)",
            **metric,
        )
        self._prompt_tokens_computed = Counter(
            "prompt_tokens_computed", "Prompt tokens of the requests served that were prefilled", **metric
        )
        self._cache_dispatches = Counter(
            "cache_dispatches",
            "Dispatches by cache-aware choice: to the worker of the request's session, to the idle worker "
            "holding the longest prefix of its conversation, or none of them (least recently used)",
            ("match",),
            **metric,
        )
        self._generation_tokens = Counter(
            "generation_tokens", "Tokens generated for clients (up to a cancel)", **metric
        )
        self._queue_wait = Histogram(
            "queue_wait_seconds",
            "Time a request waited in the queue before a worker took it (per dispatch)",
            buckets=QUEUE_WAIT_BUCKETS_S,
            **metric,
        )
        self._first_token = Histogram(
            "time_to_first_token_seconds",
            "Time from accepting a request to its first token reaching the router, queue wait included",
            buckets=FIRST_TOKEN_BUCKETS_S,
            **metric,
        )
        self._inter_token = LoopHistogram(
            "inter_token_latency_seconds",
            "Time between consecutive chunks with new tokens of one request, as they reach the router",
            INTER_TOKEN_BUCKETS_S,
        )
        self._duration = Histogram(
            "request_duration_seconds",
            "End-to-end time of calls answered OK, from receipt to the last frame, by front",
            ("front",),
            buckets=DURATION_BUCKETS_S,
            **metric,
        )
        self._registrations = Counter(
            "worker_registrations",
            "Workers registered (a restarted worker registers again, with a new pid)",
            ("device_id",),
            **metric,
        )
        self._restarts = Counter(
            "worker_restarts",
            "Worker processes started by a supervisor in place of one that died, as they register",
            ("device_id",),
            **metric,
        )
        self._losses = Counter(
            "worker_losses",
            "Workers dropped as lost (silent, disconnected or replaced)",
            ("device_id",),
            **metric,
        )
        self._missed_heartbeats = Counter(
            "worker_heartbeats_missed",
            "Heartbeat intervals a registered worker stayed silent through (liveness checks that found it "
            f"silent for over {MISSED_HEARTBEAT_AFTER_INTERVALS:g} intervals)",
            ("device_id",),
            **metric,
        )
        self._refusals = Counter(
            "refused",
            "Calls and worker connections refused for want of a valid key (common/security.py)",
            ("reason",),
            **metric,
        )
        self._pool = _PoolCollector((self._inter_token,))
        self.registry.register(self._pool)
        self._http: WSGIServer | None = None
        # Tokens relayed to clients since the start (cancelled generations included): the HTTP
        # front's status page derives the pool's tokens/s from it.
        self.tokens_relayed = 0

    # -- wiring ----------------------------------------------------------------------------------

    def follow(self, snapshot: Callable[[], Snapshot], workers: Callable[[], Iterable[WorkerRecord]]) -> None:
        """Read the gauges from these (on the running event loop, at each scrape)."""
        self._pool.follow(snapshot, workers, asyncio.get_running_loop())

    def serve(self, address: str) -> int:
        """Serve the metrics over HTTP on host:port (a background thread); returns the port."""
        host, _, port = address.rpartition(":")
        try:
            self._http, _ = start_http_server(int(port), host.strip("[]"), self.registry)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {address}: {error}") from error
        return self._http.server_port

    async def close(self) -> None:
        """Stop the HTTP endpoint, if serving."""
        http, self._http = self._http, None
        if http is not None:
            await asyncio.to_thread(http.shutdown)
            http.server_close()

    # -- requests: the scheduler and the servicer ----------------------------------------------

    def on_enqueue(self, job: Job) -> None:
        """A job enters the queue: first, or again after a lost worker (what that run produced is void)."""
        timings = job.timings
        timings.queued_at = time.monotonic()
        timings.first_token_at = None
        timings.prompt_tokens = timings.completion_tokens = timings.cached_prompt_tokens = 0
        timings.finish_reason = worker_pb2.FINISH_NONE

    def on_dispatch(self, job: Job) -> None:
        timings = job.timings
        assert timings.queued_at is not None, "every queued job went through on_enqueue"
        wait = time.monotonic() - timings.queued_at
        timings.queue_wait_s += wait
        timings.queued_at = None
        self._queue_wait.observe(wait)

    def on_chunk(self, job: Job, chunk: worker_pb2.Chunk) -> None:
        """A chunk of a running job reached the router (called before it is handed to the client)."""
        timings = job.timings
        timings.prompt_tokens = chunk.prompt_tokens
        timings.cached_prompt_tokens = chunk.cached_prompt_tokens
        timings.finish_reason = worker_pb2.FINISH_ERROR if chunk.error_kind else chunk.finish_reason
        tokens = chunk.completion_tokens
        if tokens <= timings.completion_tokens:
            return
        self.tokens_relayed += tokens - timings.completion_tokens
        timings.completion_tokens = tokens
        now = time.monotonic()
        if timings.first_token_at is None:
            timings.first_token_at = now
            self._first_token.observe(now - timings.accepted_at)
        else:
            self._inter_token.observe(now - timings.last_token_at)
        timings.last_token_at = now

    def on_call_end(self, call: Call, code: grpc.StatusCode) -> None:
        job = call.job
        finish = job.timings.finish_name if job is not None else _FINISH_NAMES[worker_pb2.FINISH_NONE]
        model = job.model or "" if job is not None else ""
        self._requests.labels(call.front, call.method, code.name, finish, model).inc()
        if job is None:
            return
        self._prompt_tokens.inc(job.timings.prompt_tokens)
        self._prompt_tokens_cached.inc(job.timings.cached_prompt_tokens)
        self._prompt_tokens_computed.inc(job.timings.prompt_tokens - job.timings.cached_prompt_tokens)
        self._generation_tokens.inc(job.timings.completion_tokens)
        if code is grpc.StatusCode.OK:
            self._duration.labels(call.front).observe(call.ended_at - call.started_at)

    def on_cache_dispatch(self, match: str) -> None:
        """A cache-aware dispatch: match is session, prefix or none (router/cache_policy.py)."""
        self._cache_dispatches.labels(match).inc()

    # -- workers: the registry -------------------------------------------------------------------

    def on_worker_registered(self, worker: WorkerRecord, restarted: bool) -> None:
        self._registrations.labels(str(worker.device_id)).inc()
        if restarted:
            self._restarts.labels(str(worker.device_id)).inc()

    def on_worker_lost(self, worker: WorkerRecord) -> None:
        self._losses.labels(str(worker.device_id)).inc()

    def on_refused(self, reason: str) -> None:
        """A refusal by common/security.py; called from the authenticator's thread too (thread-safe)."""
        self._refusals.labels(reason).inc()

    def on_liveness_check(self, worker: WorkerRecord, silence_s: float, interval_s: float) -> None:
        if silence_s > interval_s * MISSED_HEARTBEAT_AFTER_INTERVALS:
            self._missed_heartbeats.labels(str(worker.device_id)).inc()


class _PoolCollector:
    """What is read on the event loop at scrape time: the gauges, from the scheduler's snapshot and
    the registry's workers, and the LoopHistograms.

    Series exist exactly for the workers the registry knows: registered ones, and lost ones until
    a worker registers in their place, so the series of a worker that is gone disappear with it.
    """

    def __init__(self, histograms: tuple[LoopHistogram, ...]) -> None:
        self._histograms = histograms
        self._read: Callable[[], _PoolView] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    def follow(
        self,
        snapshot: Callable[[], Snapshot],
        workers: Callable[[], Iterable[WorkerRecord]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        def read() -> _PoolView:
            listed = [
                (worker.worker_id, worker.device_id, worker.model_id, worker.state.value)
                for worker in workers()
            ]
            return _PoolView(snapshot(), listed, [histogram.read() for histogram in self._histograms])

        self._read, self._loop, self._loop_thread = read, loop, threading.get_ident()

    def describe(self) -> Iterator[Metric]:
        yield from self._families()
        yield from (histogram.family() for histogram in self._histograms)

    def collect(self) -> Iterator[Metric]:
        if self._read is None:
            return
        view = self._view_from_loop()
        queue, running, states = self._families()
        queue.add_metric((), view.snapshot.queued)
        running.add_metric((), view.snapshot.running)
        for worker_id, device_id, model, state in view.workers:
            for name in WORKER_STATES:
                states.add_metric((worker_id, str(device_id), model, name), float(name == state))
        yield from (queue, running, states)
        for histogram, reading in zip(self._histograms, view.histograms, strict=True):
            yield histogram.family(reading)

    def _view_from_loop(self) -> _PoolView:
        assert self._read is not None and self._loop is not None
        if threading.get_ident() == self._loop_thread:
            return self._read()
        future: concurrent.futures.Future[_PoolView] = concurrent.futures.Future()

        def read_on_loop() -> None:
            try:
                future.set_result(self._read())
            except Exception as error:
                future.set_exception(error)

        self._loop.call_soon_threadsafe(read_on_loop)
        return future.result(SCRAPE_TIMEOUT_S)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(f"{NAMESPACE}_queue_length", "Requests waiting for a worker", labels=()),
            GaugeMetricFamily(
                f"{NAMESPACE}_requests_running",
                "Requests on a worker, including those whose cancel is not confirmed yet",
                labels=(),
            ),
            GaugeMetricFamily(
                f"{NAMESPACE}_worker_state",
                "1 for the state each known worker is in (idle, busy or lost), 0 for the others",
                labels=("worker_id", "device_id", "model", "state"),
            ),
        )
