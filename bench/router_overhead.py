"""The router alone, measured with paced workers (no model): four scenarios side by side in one run.

Each scenario starts its own router and paced workers as real subprocesses on loopback (bench.pool),
with the router pinned to one core and this client to the others. Workers run at low priority
(nice 10): in the relay and memory scenarios beside the client, in the latency and efficiency
scenarios (up to 256 workers, most of a core at chip pace) on any core.

- added latency: client receive time - Completion.create_time per frame, at chip pace (10 tokens/s,
  first token after 0.7 s) for 1, 16, 64 and 256 concurrent streams, one worker per stream (nothing
  queues; the pool grows from level to level). Beside it, the floor: the same client against a
  bare gRPC server (bench.grpc_floor).
- relay capacity: chunks/s and frames/s through the router with workers emitting as fast as they
  can, and the router's CPU per frame at a pace the client follows frame by frame.
- pool efficiency: tokens/s of 8, 32 and 128 workers under saturation, as a fraction of
  workers x rate, and the moments a worker sat idle while requests waited.
- memory: the router's RSS idle and with 1,000 requests queued.

    python -m bench.router_overhead [--quick] [--only latency,relay,efficiency,memory] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc
import psutil

from bench import grpc_floor, targets
from bench.loadgen import BUILTIN_PROMPTS, LoadRun, LoadSpec, build_request, run_load
from bench.pool import PacedPool, PoolSpec, RouterState, pin_process, split_cpus
from bench.profile import record as profile_process
from bench.stats import NS_PER_S, Distribution, RequestRecord
from common.config import EVENT_LOOPS, PacedConfig
from protos.inference_pb2_grpc import InferenceServiceStub

SCENARIOS = ("latency", "relay", "efficiency", "memory")
CHIP_PACE = PacedConfig(tokens_per_second=10.0, first_token_delay_s=0.7, tokens_per_request=64)
# Streams start at random offsets within one token period, so their tokens are not in lockstep.
CHIP_TOKEN_PERIOD_S = 1 / CHIP_PACE.tokens_per_second
# The paced engine's "as fast as possible": the worker never waits between tokens.
FLAT_OUT_TOKENS_PER_SECOND = 0.0
STREAMS_PER_CONNECTION = 16  # clients sharing one HTTP/2 connection; more streams use more connections
MB = 1 << 20
STATE_SAMPLE_S = 0.2  # scrapes cost the router a little CPU: a few per second only
PROFILED_STREAMS = 64
PROFILE_WARMUP_S = 1.5
RELAY_TOKENS_PER_REQUEST = 100_000  # long streams: the relay is measured, not request set-up
# A pace the client (sharing a core with the workers) follows frame by frame: 4 x 500 frames/s.
RELAY_PACED_TOKENS_PER_SECOND = 500.0
QUEUE_PROBES = 200
QUEUE_PROBE_S = 0.2
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Settings:
    latency_streams: tuple[int, ...] = (1, 16, 64, 256)
    latency_duration_s: float = 30.0
    relay_workers: int = 4
    relay_warmup_s: float = 2.0
    relay_duration_s: float = 10.0
    efficiency_workers: tuple[int, ...] = (8, 32, 128)
    efficiency_tokens_per_request: int = 32
    efficiency_warmup_s: float = 2.0
    efficiency_duration_s: float = 30.0
    idle_threshold_ms: float = 10.0  # a worker's gap between requests longer than this counts as idle
    queued_requests: int = 1000
    memory_workers: int = 2
    profile_s: float = 0.0  # > 0: also profile the router (py-spy) this long in latency@64 and relay
    event_loop: str = "uvloop"  # the router's and the bare gRPC server's (router.event_loop)


# About a minute: short windows, and neither the 256-worker nor the 128-worker pool (starting
# them alone takes ~30 s on 2 cores).
QUICK = Settings(
    latency_streams=(1, 16, 64),
    latency_duration_s=3.0,
    relay_warmup_s=1.0,
    relay_duration_s=3.0,
    efficiency_workers=(8, 32),
    efficiency_warmup_s=0.5,
    efficiency_duration_s=3.0,
)


class CpuMeter:
    """CPU time a process used since start(), as a fraction of one core over the wall time."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.start()

    def start(self) -> None:
        self._cpu = self._cpu_seconds()
        self._wall = time.monotonic()

    def seconds(self) -> float:
        return self._cpu_seconds() - self._cpu

    def utilisation(self) -> float:
        return self.seconds() / max(time.monotonic() - self._wall, 1e-9)

    def _cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system


@contextlib.contextmanager
def pinned_to(cpus: frozenset[int]) -> Iterator[None]:
    """Keep this process (the load-generating client) off the router's core while inside."""
    before = os.sched_getaffinity(0)
    pin_process(os.getpid(), cpus)
    try:
        yield
    finally:
        pin_process(os.getpid(), frozenset(before))


def _connections(streams: int) -> int:
    return max(1, math.ceil(streams / STREAMS_PER_CONNECTION))


def _window_frames(records: Sequence[RequestRecord], start_ns: int, end_ns: int) -> tuple[int, int]:
    """(frames, tokens) received within [start_ns, end_ns)."""
    frames = tokens = 0
    for record in records:
        previous = 0
        for recv, count in zip(record.recv_ns, record.tokens, strict=True):
            if start_ns <= recv < end_ns:
                frames += 1
                tokens += count - previous
            previous = count
    return frames, tokens


async def _run_for(
    addr: str, spec: LoadSpec, warmup_s: float, window_s: float, router: psutil.Process
) -> tuple[LoadRun, int, int, float]:
    """Run load for warmup + window seconds, then stop it (cancelling calls in flight).

    Returns the run, the window's bounds (wall-clock ns) and the router's CPU seconds in the window.
    """
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(addr, spec, BUILTIN_PROMPTS, stop))
    await asyncio.sleep(warmup_s)
    meter = CpuMeter(router)
    window_start = time.time_ns()
    await asyncio.sleep(window_s)
    window_end = time.time_ns()
    router_cpu_s = meter.seconds()
    stop.set()
    return await load, window_start, window_end, router_cpu_s


# ---- (a) added latency per token ---------------------------------------------------------------


async def added_latency(settings: Settings, scratch: Path, artifacts: Path) -> dict:
    router_cpus, other_cpus = split_cpus()
    counts = sorted(settings.latency_streams)
    spec = PoolSpec(
        event_loop=settings.event_loop,
        workers=counts[0],
        paced=CHIP_PACE,
        router_cpus=router_cpus,
        # 256 paced workers need most of a core of their own (BENCHMARKS.md): at low priority they
        # take what the router and the client leave, on any core.
        worker_cpus=router_cpus | other_cpus,
    )
    levels = []
    profile = None
    with pinned_to(other_cpus), PacedPool(spec, scratch / "latency") as pool:
        for streams in counts:  # one worker per stream: the pool grows from level to level
            pool.add_workers(streams - len(pool.workers))
            levels.append(await _latency_level(pool, streams, settings.latency_duration_s))
            await pool.wait_until_idle()
            if streams == PROFILED_STREAMS and settings.profile_s > 0:
                load = _streams_spec(streams, ramp_s=CHIP_TOKEN_PERIOD_S)
                profile = await _profiled(pool, load, settings.profile_s, artifacts / "router-latency-64")
                await pool.wait_until_idle()
        memory = pool.memory()
    floor_server = grpc_floor.FloorServer(CHIP_PACE, router_cpus, scratch / "floor", settings.event_loop)
    with pinned_to(other_cpus), floor_server as floor:
        duration_s = settings.latency_duration_s
        floor_levels = [await _floor_level(floor.addr, streams, duration_s) for streams in counts]
    return {
        "pace": asdict(CHIP_PACE),
        "levels": levels,
        "grpc_floor": floor_levels,
        "process_memory": memory,
        "profile_at_64": profile,
    }


def _streams_spec(streams: int, duration_s: float = 3600.0, ramp_s: float = 0.0) -> LoadSpec:
    """Closed loop on `streams` streams until the duration or a stop, then cancel what runs."""
    return LoadSpec(
        concurrency=streams,
        duration_s=duration_s,
        cancel_at_end=True,
        channels=_connections(streams),
        ramp_s=ramp_s,
    )


async def _latency_level(pool: PacedPool, streams: int, duration_s: float) -> dict:
    spec = _streams_spec(streams, duration_s, CHIP_TOKEN_PERIOD_S)
    meter = CpuMeter(pool.router_process())
    workers_cpu_s = pool.workers_cpu_seconds()
    began = time.monotonic()
    report = (await run_load(pool.addr, spec, BUILTIN_PROMPTS)).report()
    workers_cpu_s = pool.workers_cpu_seconds() - workers_cpu_s
    elapsed_s = time.monotonic() - began
    return {
        "streams": streams,
        "workers": len(pool.workers),
        "connections": spec.channels,
        "added_latency_ms": asdict(report.frame_delay_ms),
        "frames": report.frames,
        "frames_per_s": report.frames / report.wall_s,
        "ttft_ms": asdict(report.ttft_ms),
        "inter_token_ms": asdict(report.inter_token_ms),
        "router_cpu_utilisation": meter.utilisation(),
        "workers_cpu_utilisation": workers_cpu_s / elapsed_s,  # in cores, all workers together
        "requests_by_status": report.by_status,
    }


async def _floor_level(addr: str, streams: int, duration_s: float) -> dict:
    spec = _streams_spec(streams, duration_s, CHIP_TOKEN_PERIOD_S)
    report = (await run_load(addr, spec, BUILTIN_PROMPTS)).report()
    return {"streams": streams, "added_latency_ms": asdict(report.frame_delay_ms), "frames": report.frames}


async def _profiled(pool: PacedPool, load: LoadSpec, seconds: float, raw_base: Path) -> dict:
    """Profile the router under `load` (a pass of its own: py-spy takes CPU from the client's core)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_load(pool.addr, load, BUILTIN_PROMPTS, stop))
    await asyncio.sleep(PROFILE_WARMUP_S)
    raw_path = raw_base.with_suffix(".pyspy.txt")
    summary = await asyncio.to_thread(profile_process, pool.router_process().pid, seconds, raw_path)
    stop.set()
    await task
    return {"raw_stacks": str(raw_path), "summary": summary.format()}


# ---- (b) relay capacity ------------------------------------------------------------------------


async def relay_capacity(settings: Settings, scratch: Path, artifacts: Path) -> dict:
    """Flat out (the workers never sleep), then at a pace the client follows frame by frame.

    A worker chunk carries one token, so tokens/s in the client is chunks/s relayed. A router that
    finds several chunks of a stream pending sends them as one frame, so gRPC frames/s can be lower:
    the flat-out run shows how far that takes it, the paced one what a frame costs on its own. Beside
    it, what a frame costs a bare grpc.aio server at the same pace (bench.grpc_floor): the part of
    the router's cost that any Python gRPC server pays.
    """
    flat_out = await _relay_run(settings, FLAT_OUT_TOKENS_PER_SECOND, scratch / "flat-out", artifacts)
    paced = await _relay_run(settings, RELAY_PACED_TOKENS_PER_SECOND, scratch / "paced", artifacts)
    floor = await _relay_floor(settings, RELAY_PACED_TOKENS_PER_SECOND, scratch / "floor")
    return {"flat_out": flat_out, "one_frame_per_chunk": paced, "grpc_floor_one_frame_per_chunk": floor}


async def _relay_run(settings: Settings, tokens_per_second: float, scratch: Path, artifacts: Path) -> dict:
    router_cpus, other_cpus = split_cpus()
    paced = PacedConfig(
        tokens_per_second=tokens_per_second,
        first_token_delay_s=0.0,
        tokens_per_request=RELAY_TOKENS_PER_REQUEST,
    )
    spec = PoolSpec(
        event_loop=settings.event_loop,
        workers=settings.relay_workers,
        paced=paced,
        router_cpus=router_cpus,
        worker_cpus=other_cpus,
    )
    load = _streams_spec(settings.relay_workers)
    profile = None
    with pinned_to(other_cpus), PacedPool(spec, scratch) as pool:
        router = pool.router_process()
        run, start, end, router_cpu_s = await _run_for(
            pool.addr, load, settings.relay_warmup_s, settings.relay_duration_s, router
        )
        await pool.wait_until_idle()
        if settings.profile_s > 0:
            profile = await _profiled(
                pool, load, settings.profile_s, artifacts / f"router-relay-{scratch.name}"
            )
    frames, chunks = _window_frames(run.records, start, end)
    window_s = (end - start) / NS_PER_S
    return {
        "workers": settings.relay_workers,
        "worker_tokens_per_s": tokens_per_second,
        "router_cpus": sorted(router_cpus),
        "window_s": window_s,
        "chunks_per_s": chunks / window_s,
        "frames_per_s": frames / window_s,
        "chunks_per_frame": chunks / frames if frames else None,
        "router_cpu_utilisation": router_cpu_s / window_s,
        # What the router relays per second of its own CPU time: its capacity on one core if the
        # cost per chunk stayed the same up to saturation. Equals chunks_per_s at utilisation 1.
        "chunks_per_router_cpu_s": chunks / router_cpu_s if router_cpu_s > 0 else None,
        "router_cpu_us_per_frame": router_cpu_s / frames * 1e6 if frames else None,
        "added_latency_ms": asdict(Distribution.of(_window_delays(run.records, start, end)).scaled(1e3)),
        "requests_by_status": run.report().by_status,
        "profile": profile,
    }


async def _relay_floor(settings: Settings, tokens_per_second: float, scratch: Path) -> dict:
    router_cpus, other_cpus = split_cpus()
    paced = PacedConfig(
        tokens_per_second=tokens_per_second,
        first_token_delay_s=0.0,
        tokens_per_request=RELAY_TOKENS_PER_REQUEST,
    )
    floor_server = grpc_floor.FloorServer(paced, router_cpus, scratch, settings.event_loop)
    with pinned_to(other_cpus), floor_server as floor:
        server = psutil.Process(floor.process.pid)
        run, start, end, server_cpu_s = await _run_for(
            floor.addr,
            _streams_spec(settings.relay_workers),
            settings.relay_warmup_s,
            settings.relay_duration_s,
            server,
        )
    frames, _ = _window_frames(run.records, start, end)
    window_s = (end - start) / NS_PER_S
    return {
        "streams": settings.relay_workers,
        "tokens_per_s_each": tokens_per_second,
        "window_s": window_s,
        "frames_per_s": frames / window_s,
        "server_cpu_utilisation": server_cpu_s / window_s,
        "server_cpu_us_per_frame": server_cpu_s / frames * 1e6 if frames else None,
        "frames_per_server_cpu_s": frames / server_cpu_s if server_cpu_s > 0 else None,
    }


def _window_delays(records: Sequence[RequestRecord], start_ns: int, end_ns: int) -> list[float]:
    return [
        (recv - created) / NS_PER_S
        for record in records
        for recv, created in zip(record.recv_ns, record.create_ns, strict=True)
        if start_ns <= recv < end_ns and created > 0
    ]


# ---- (c) pool efficiency -----------------------------------------------------------------------


async def pool_efficiency(settings: Settings, scratch: Path, artifacts: Path) -> dict:
    router_cpus, other_cpus = split_cpus()
    rate = CHIP_PACE.tokens_per_second
    # First token one token period after the dispatch: a request of n tokens then takes exactly
    # n / rate on the worker, so a worker that is never idle makes exactly `rate` tokens/s.
    paced = PacedConfig(
        tokens_per_second=rate,
        first_token_delay_s=1 / rate,
        tokens_per_request=settings.efficiency_tokens_per_request,
    )
    counts = sorted(settings.efficiency_workers)
    # As in the latency scenario, the workers run at low priority on any core.
    spec = PoolSpec(
        event_loop=settings.event_loop,
        workers=counts[0],
        paced=paced,
        router_cpus=router_cpus,
        worker_cpus=router_cpus | other_cpus,
    )
    levels = []
    with pinned_to(other_cpus), PacedPool(spec, scratch / "efficiency") as pool:
        for workers in counts:
            pool.add_workers(workers - len(pool.workers))
            levels.append(await _efficiency_level(pool, workers, paced, settings))
            await pool.wait_until_idle()
        memory = pool.memory()
    return {"pace": asdict(paced), "levels": levels, "process_memory": memory}


async def _efficiency_level(pool: PacedPool, workers: int, paced: PacedConfig, settings: Settings) -> dict:
    streams = 2 * workers  # saturation: as many requests waiting as running
    # Streams start spread over one request's duration, so requests of equal length do not all end
    # (and ask for the next dispatch) at the same moment; the window opens once all have started.
    request_s = paced.tokens_per_request / paced.tokens_per_second
    sampling = asyncio.Event()
    sampler = asyncio.create_task(_sample_router_state(pool, sampling))
    run, start, end, router_cpu_s = await _run_for(
        pool.addr,
        _streams_spec(streams, ramp_s=request_s),
        request_s + settings.efficiency_warmup_s,
        settings.efficiency_duration_s,
        pool.router_process(),
    )
    sampling.set()
    states = [state for at, state in await sampler if start <= at < end]
    _, tokens = _window_frames(run.records, start, end)
    window_s = (end - start) / NS_PER_S
    ideal = workers * paced.tokens_per_second
    gaps = idle_gaps(run.records, paced, start, end)
    threshold_s = settings.idle_threshold_ms / 1e3
    return {
        "workers": workers,
        "streams": streams,
        "window_s": window_s,
        "tokens_per_s": tokens / window_s,
        "ideal_tokens_per_s": ideal,
        "efficiency": tokens / window_s / ideal,
        "workers_seen": len({record.worker_id for record in run.records if record.worker_id}),
        "dispatch_gap_ms": asdict(Distribution.of(gaps).scaled(1e3)),
        "idle_while_queued": sum(gap > threshold_s for gap in gaps),
        "idle_threshold_ms": settings.idle_threshold_ms,
        "router_state_samples": len(states),
        "router_samples_idle_while_queued": sum(s.queued > 0 and s.idle_workers > 0 for s in states),
        "router_samples_queue_empty": sum(s.queued == 0 for s in states),
        "router_cpu_utilisation": router_cpu_s / window_s,
        "requests_by_status": run.report().by_status,
    }


async def _sample_router_state(pool: PacedPool, done: asyncio.Event) -> list[tuple[int, RouterState]]:
    """The router's queue and worker gauges every STATE_SAMPLE_S until `done` (each sample is one
    consistent reading: the router reads its gauges on its event loop), stamped with time.time_ns()."""
    samples = []
    while not done.is_set():
        state = await asyncio.to_thread(pool.state)
        samples.append((time.time_ns(), state))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), STATE_SAMPLE_S)
    return samples


def idle_gaps(
    records: Sequence[RequestRecord], paced: PacedConfig, start_ns: int, end_ns: int
) -> list[float]:
    """Seconds each worker spent between finishing a request and receiving its next one while
    another request waited in the queue, for every such change within [start_ns, end_ns).

    Derived on the client from the workers' own clock (create_time; one clock on one host): a
    worker makes the last chunk of a request at e and its next request reaches it at
    d = (create time of that request's first chunk) - first_token_delay_s; it sat idle d - e. The
    gap counts only if some request sent before e had not reached a worker by e (it was queued).
    """
    delay_ns = round(paced.first_token_delay_s * NS_PER_S)
    by_worker: dict[str, list[RequestRecord]] = defaultdict(list)
    waits = []  # (sent, reached a worker) per request; never started = still waiting at the end
    for record in records:
        if record.worker_id and record.create_ns:
            by_worker[record.worker_id].append(record)
            waits.append((record.sent_ns, record.create_ns[0] - delay_ns))
        else:
            waits.append((record.sent_ns, math.inf))
    gaps = []
    for served in by_worker.values():
        served.sort(key=lambda record: record.create_ns[0])
        for previous, following in itertools.pairwise(served):
            ended = previous.create_ns[-1]
            reached = following.create_ns[0] - delay_ns
            if start_ns <= ended < end_ns and any(sent < ended < began for sent, began in waits):
                gaps.append(max(0, reached - ended) / NS_PER_S)
    return gaps


# ---- (d) memory with a full queue --------------------------------------------------------------


async def router_memory(settings: Settings, scratch: Path, artifacts: Path) -> dict:
    router_cpus, other_cpus = split_cpus()
    # Slow workers that stay busy for the whole scenario, so every further request waits.
    paced = PacedConfig(tokens_per_second=1.0, first_token_delay_s=0.0, tokens_per_request=10_000)
    waiting = settings.queued_requests
    spec = PoolSpec(
        event_loop=settings.event_loop,
        workers=settings.memory_workers,
        paced=paced,
        queue_size=waiting,
        router_cpus=router_cpus,
        worker_cpus=other_cpus,
    )
    with pinned_to(other_cpus), PacedPool(spec, scratch / "memory") as pool:
        router = pool.router_process()
        idle_rss = router.memory_info().rss
        stop = asyncio.Event()
        load = _streams_spec(waiting + settings.memory_workers)
        task = asyncio.create_task(run_load(pool.addr, load, BUILTIN_PROMPTS, stop))
        probes = await _wait_until_queue_full(pool.addr)
        full_rss = router.memory_info().rss
        stop.set()
        run = await task
        await pool.wait_until_idle()
        after_rss = router.memory_info().rss
    return {
        "workers": settings.memory_workers,
        "queued": waiting,
        "queue_full_after_probes": probes,
        "rss_idle_mb": idle_rss / MB,
        "rss_queued_mb": full_rss / MB,
        "rss_after_mb": after_rss / MB,
        "per_queued_request_kb": (full_rss - idle_rss) / waiting / 1024,
        "requests_by_status": run.report().by_status,
    }


async def _wait_until_queue_full(addr: str) -> int:
    """Probe until the router answers RESOURCE_EXHAUSTED: then exactly queue_size requests wait.

    A probe that finds room waits in the queue until its short deadline, when the router drops it;
    one that finds a worker still free (the load has not taken them all yet) is cancelled at once.
    Returns the number of probes sent.
    """
    request = build_request(LoadSpec(requests=1), "probe")
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = InferenceServiceStub(channel)
        for probe in range(1, QUEUE_PROBES + 1):
            call = stub.StreamComplete(request, timeout=QUEUE_PROBE_S)
            try:
                await call.read()
                call.cancel()
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return probe
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
    raise RuntimeError(f"the router's queue was not full after {QUEUE_PROBES} probes")


# ---- the suite ---------------------------------------------------------------------------------

RUNNERS = {
    "latency": added_latency,
    "relay": relay_capacity,
    "efficiency": pool_efficiency,
    "memory": router_memory,
}


async def run_suite(settings: Settings, scenarios: Sequence[str], artifacts: Path) -> dict:
    """Run the scenarios in order; profiles (if any) are written under `artifacts`."""
    artifacts.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": asdict(settings)}
    with tempfile.TemporaryDirectory(prefix="bench-router-") as scratch:
        for name in scenarios:
            print(f"router overhead: {name} ...", file=sys.stderr, flush=True)
            began = time.monotonic()
            results[name] = await RUNNERS[name](settings, Path(scratch) / name, artifacts)
            results[name]["elapsed_s"] = time.monotonic() - began
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.router_overhead", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser, names: Sequence[str] = SCENARIOS) -> None:
    """The suite's options (shared with `python -m bench`, which runs more than these `names`)."""
    parser.add_argument("--quick", action="store_true", help="short windows, fewer levels (about a minute)")
    subset = f"comma-separated subset of: {', '.join(names)}"
    parser.add_argument("--only", default=",".join(names), help=subset)
    parser.add_argument("--duration", type=float, help="seconds per measurement window (overrides)")
    parser.add_argument("--profile", type=float, default=0.0, metavar="S", help="also py-spy the router S s")
    parser.add_argument("--artifacts", type=Path, default=RESULTS_DIR, help="where results and profiles go")
    parser.add_argument(
        "--event-loop", choices=EVENT_LOOPS, default="uvloop", help="the router's and the floor's loop"
    )


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, list[str]]:
    settings = QUICK if args.quick else Settings()
    if args.duration is not None:
        if not args.duration > 0:
            raise ValueError(f"--duration must be positive, got {args.duration}")
        settings = replace(
            settings,
            latency_duration_s=args.duration,
            relay_duration_s=args.duration,
            efficiency_duration_s=args.duration,
        )
    if args.profile < 0:
        raise ValueError(f"--profile must be >= 0 seconds, got {args.profile}")
    settings = replace(settings, profile_s=args.profile, event_loop=args.event_loop)
    scenarios = [name.strip() for name in args.only.split(",") if name.strip()]
    if not scenarios or not set(scenarios) <= set(SCENARIOS):
        raise ValueError(f"--only takes names from {', '.join(SCENARIOS)}; got {args.only!r}")
    return settings, scenarios


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings, scenarios = settings_from_args(args)
    except ValueError as error:
        print(f"router_overhead: {error}", file=sys.stderr)
        return 2
    results = asyncio.run(run_suite(settings, scenarios, args.artifacts))
    print(targets.format_table(targets.evaluate({"router": results})))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
