"""Load generator: drives StreamComplete at a concurrency or a Poisson request rate and reports
time to first token, inter-token latency, tokens/s per stream and in total, and requests by status.

    python -m bench.loadgen --addr 127.0.0.1:18000 --concurrency 16 --requests 200
    python -m bench.loadgen --rate 2 --duration 60 --prompts my_prompts.txt --json report.json

Closed loop (--concurrency N): N streams, each sending its next request as soon as the previous
one ends. Open loop (--rate R): requests start at Poisson-distributed times, R per second on
average, however many are already running. The run stops issuing requests after --requests calls
or --duration seconds, whichever comes first, then waits for the calls in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.stats import Distribution, LoadReport, RequestRecord, summarize
from protos import inference_pb2 as pb
from protos.inference_pb2_grpc import InferenceServiceStub
from router.validation import USER

CONNECT_TIMEOUT_S = 10.0
# A small mixed set: short and longer questions, Chinese and English, as chip users send them.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "你好，请介绍一下你自己。",
    "What is the capital of France?",
    "用三句话解释什么是机器学习。",
    "Write a short poem about the sea.",
    "请把这句话翻译成英文：今天天气很好，我们去公园散步吧。",
    "Explain the difference between a process and a thread.",
    "给我讲一个关于小猫的简短故事。",
    "List three tips for writing clear technical documentation.",
    "北京和上海有什么不同？",
    "How does a binary search work? Answer briefly.",
    "请写一段Python代码，计算斐波那契数列的前十项。",
    "Summarize the plot of Romeo and Juliet in two sentences.",
)


@dataclass(frozen=True)
class LoadSpec:
    """How to drive the service. Exactly one of concurrency (closed loop) or rate (open loop)."""

    concurrency: int | None = 1
    rate: float | None = None  # requests per second, Poisson arrivals
    requests: int | None = None  # stop issuing after this many requests
    duration_s: float | None = None  # ... or after this long
    cancel_at_end: bool = False  # when the duration ends (or the run is stopped), cancel calls in flight
    max_new_tokens: int | None = None  # None = the deployment's default
    temperature: float | None = None
    system_message: str = ""
    timeout_s: float = 600.0  # per call
    channels: int = 1  # gRPC connections the streams are spread over
    # Closed loop: each stream starts after a random delay in [0, ramp_s), so that streams of
    # equal length do not run in lockstep (independent chips are not synchronised either).
    ramp_s: float = 0.0
    seed: int = 0  # Poisson arrival times, stream start offsets

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be a positive number of requests per second, got {self.rate}")
        if self.requests is None and self.duration_s is None:
            raise ValueError("give a request count, a duration, or both")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be at least 1, got {self.requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be positive, got {self.duration_s}")
        if self.ramp_s < 0:
            raise ValueError(f"ramp must be >= 0 seconds, got {self.ramp_s}")
        if self.channels < 1:
            raise ValueError(f"channels must be at least 1, got {self.channels}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")


@dataclass
class LoadRun:
    spec: LoadSpec
    records: list[RequestRecord]
    started_ns: int
    ended_ns: int

    def report(self) -> LoadReport:
        return summarize(self.records, self.started_ns, self.ended_ns)


def load_prompts(path: Path | None) -> list[str]:
    """The prompts of a UTF-8 text file, one per line (blank lines skipped), or the built-in set."""
    if path is None:
        return list(BUILTIN_PROMPTS)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"cannot read prompt file {path}: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"prompt file {path} is not UTF-8 text: {error.reason}") from error
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt (one per line expected)")
    return prompts


def build_request(spec: LoadSpec, prompt: str) -> pb.CompletionRequest:
    request = pb.CompletionRequest(
        system_message=spec.system_message, history=[pb.ChatMessage(role=USER, content=prompt)]
    )
    if spec.max_new_tokens is not None:
        request.max_new_tokens = spec.max_new_tokens
    if spec.temperature is not None:
        request.temperature = spec.temperature
    return request


async def run_load(
    addr: str,
    spec: LoadSpec,
    prompts: Sequence[str],
    stop: asyncio.Event | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> LoadRun:
    """Drive the service at addr as spec says; every request issued is in the returned records.

    Setting `stop` ends the run early, as the end of spec.duration_s does. `credentials`: connect
    with TLS; `metadata` goes with every call (e.g. an API key).
    """
    if not prompts:
        raise ValueError("no prompts to send")
    channels = [
        grpc.aio.secure_channel(addr, credentials) if credentials else grpc.aio.insecure_channel(addr)
        for _ in range(spec.channels)
    ]
    try:
        await _connect(addr, channels)
        stubs = [InferenceServiceStub(channel) for channel in channels]
        driver = _Driver(spec, stubs, prompts, stop or asyncio.Event(), tuple(metadata))
        started_ns = time.time_ns()
        await driver.run()
        return LoadRun(spec, driver.records, started_ns, time.time_ns())
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


async def _connect(addr: str, channels: list[grpc.aio.Channel]) -> None:
    """Fail early and clearly when nothing answers at addr, instead of recording a flood of errors."""
    try:
        ready = asyncio.gather(*(channel.channel_ready() for channel in channels))
        await asyncio.wait_for(ready, CONNECT_TIMEOUT_S)
    except TimeoutError:
        message = f"no gRPC server answers at {addr} (waited {CONNECT_TIMEOUT_S:.0f} s)"
        raise ConnectionError(message) from None


class _Driver:
    """Issues requests until the count is reached or the run is stopped, recording every frame."""

    def __init__(
        self,
        spec: LoadSpec,
        stubs: list[InferenceServiceStub],
        prompts: Sequence[str],
        stop: asyncio.Event,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.spec = spec
        self.metadata = metadata
        self.stubs = stubs
        self.requests = [build_request(spec, prompt) for prompt in prompts]
        self.records: list[RequestRecord] = []
        self._indices = itertools.count()
        self._stop = stop

    async def run(self) -> None:
        timer = None
        if self.spec.duration_s is not None:
            timer = asyncio.get_running_loop().call_later(self.spec.duration_s, self._stop.set)
        try:
            if self.spec.rate is not None:
                await self._open_loop(self.spec.rate)
            else:
                await self._closed_loop(self.spec.concurrency)
        finally:
            if timer is not None:
                timer.cancel()

    def _next_index(self) -> int | None:
        """The index of the next request to issue, or None once the run is over."""
        if self._stop.is_set():
            return None
        index = next(self._indices)
        if self.spec.requests is not None and index >= self.spec.requests:
            return None
        return index

    async def _closed_loop(self, concurrency: int) -> None:
        offsets = random.Random(self.spec.seed)

        async def stream(start_after_s: float) -> None:
            await asyncio.sleep(start_after_s)
            while (index := self._next_index()) is not None:
                await self._one_request(index)

        starts = [
            offsets.uniform(0, self.spec.ramp_s) if self.spec.ramp_s else 0.0 for _ in range(concurrency)
        ]
        await self._finish({asyncio.create_task(stream(start)) for start in starts})

    async def _open_loop(self, rate: float) -> None:
        arrivals = random.Random(self.spec.seed)
        loop = asyncio.get_running_loop()
        in_flight: set[asyncio.Task] = set()
        stopped = asyncio.create_task(self._stop.wait())
        next_at = loop.time()
        while (index := self._next_index()) is not None:
            task = asyncio.create_task(self._one_request(index))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            next_at += arrivals.expovariate(rate)
            await asyncio.wait({stopped}, timeout=max(0.0, next_at - loop.time()))
        stopped.cancel()
        await self._finish(set(in_flight))

    async def _finish(self, tasks: set[asyncio.Task]) -> None:
        """Wait for the tasks; once stopped, cancel those still running if the spec says so."""
        if not tasks:
            return
        if self.spec.cancel_at_end:
            all_done = asyncio.gather(*tasks, return_exceptions=True)
            stopped = asyncio.create_task(self._stop.wait())
            await asyncio.wait({all_done, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            for task in tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one_request(self, index: int) -> None:
        record = RequestRecord(index=index, sent_ns=time.time_ns())
        self.records.append(record)
        stub = self.stubs[index % len(self.stubs)]
        request = self.requests[index % len(self.requests)]
        try:
            call = stub.StreamComplete(request, timeout=self.spec.timeout_s, metadata=self.metadata)
            async for frame in call:
                _record_frame(record, frame, time.time_ns())
            record.status = grpc.StatusCode.OK.name
        except grpc.aio.AioRpcError as error:
            record.status = error.code().name
            record.detail = error.details() or ""
        except asyncio.CancelledError:
            record.status = grpc.StatusCode.CANCELLED.name
            record.detail = "cancelled by the load generator at the end of its run"
            raise


def _record_frame(record: RequestRecord, frame: pb.Completion, recv_ns: int) -> None:
    created = frame.create_time
    record.recv_ns.append(recv_ns)
    record.create_ns.append(created.seconds * 1_000_000_000 + created.nanos)
    record.tokens.append(frame.token_usage)
    if frame.worker_id:
        record.worker_id = frame.worker_id
    if frame.prompt_tokens:
        record.prompt_tokens = frame.prompt_tokens
    if frame.finished:
        record.finish_reason = pb.FinishReason.Name(frame.finish_reason)
        if frame.finish_reason == pb.ERROR:
            record.detail = frame.output_text


def format_report(report: LoadReport) -> str:
    """A plain-text table for the terminal."""
    lines = [
        f"requests        {report.requests}  by status: {_counts(report.by_status)}",
        f"finish reasons  {_counts(report.by_finish_reason)}",
        f"wall time       {report.wall_s:.2f} s   ({report.request_rate:.2f} requests/s)",
        f"tokens          {report.tokens} in {report.frames} frames, "
        f"{report.tokens_per_s_total:.1f} tokens/s total",
        "",
        f"{'':28}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}{'max':>10}{'n':>9}",
        _row("time to first token (ms)", report.ttft_ms),
        _row("inter-token latency (ms)", report.inter_token_ms),
        _row("frame delay (ms) [1]", report.frame_delay_ms),
        _row("tokens/s per stream [2]", report.stream_tokens_per_s),
        "",
        "[1] client receive time - Completion.create_time; meaningful only with workers on this host",
        "[2] after the first token; min " + _number(report.stream_tokens_per_s.min) + " (the slowest stream)",
    ]
    return "\n".join(lines)


def _row(label: str, distribution: Distribution) -> str:
    figures = (distribution.p50, distribution.p90, distribution.p99, distribution.mean, distribution.max)
    return f"{label:28}" + "".join(f"{_number(value):>10}" for value in figures) + f"{distribution.count:>9}"


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "-"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default="127.0.0.1:18000", help="router gRPC address (host:port)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: streams kept busy (default 1)")
    mode.add_argument("--rate", type=float, help="open loop: requests per second, Poisson arrivals")
    parser.add_argument("--requests", type=int, help="requests to issue (default 100 without --duration)")
    parser.add_argument("--duration", type=float, help="seconds to keep issuing requests")
    parser.add_argument("--prompts", type=Path, help="UTF-8 file, one prompt per line (default: built-in)")
    parser.add_argument("--system", default="", help="system message sent with every request")
    parser.add_argument("--max-new-tokens", type=int, help="per request (default: the deployment's)")
    parser.add_argument("--temperature", type=float, help="per request (default: the deployment's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per call (default 600)")
    parser.add_argument("--channels", type=int, default=1, help="gRPC connections to spread over")
    parser.add_argument("--ramp", type=float, default=0.0, help="closed loop: start streams within S s")
    parser.add_argument("--seed", type=int, default=0, help="seed of arrival times and stream starts")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' = stdout)")
    return parser.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    requests = args.requests if args.requests is not None or args.duration is not None else 100
    return LoadSpec(
        concurrency=None if args.rate is not None else (args.concurrency or 1),
        rate=args.rate,
        requests=requests,
        duration_s=args.duration,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        system_message=args.system,
        timeout_s=args.timeout,
        channels=args.channels,
        ramp_s=args.ramp,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = spec_from_args(args)
        prompts = load_prompts(args.prompts)
    except ValueError as error:
        print(f"loadgen: {error}", file=sys.stderr)
        return 2
    try:
        run = asyncio.run(run_load(args.addr, spec, prompts))
    except ConnectionError as error:
        print(f"loadgen: {error}", file=sys.stderr)
        return 2
    report = run.report()
    print(format_report(report))
    if args.json:
        document = json.dumps({"addr": args.addr, "spec": asdict(spec), "report": report.to_dict()}, indent=2)
        if args.json == "-":
            print(document)
        else:
            Path(args.json).write_text(document + "\n", encoding="utf-8")
    return 0 if report.by_status.keys() <= {grpc.StatusCode.OK.name} else 1


if __name__ == "__main__":
    sys.exit(main())
