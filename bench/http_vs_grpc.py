"""The HTTP/SSE front beside the gRPC front: added latency per token and router CPU per token, at
1, 16 and 64 concurrent streams with paced workers at chip pace, side by side in one run.

One router (pinned to its own core) with 64 paced workers; at each level the same number of streams
runs over gRPC (StreamComplete) and over HTTP (/v1/chat/completions, stream: true), alternating
round by round (one request per stream each), each stream its own worker, so nothing queues. The
client sits on the other cores.

Added latency is measured the same way for both fronts, from the client's clock alone (an SSE chunk
carries no worker timestamp): a paced worker emits token i at (its start + first_token_delay_s +
i / tokens_per_second), so a frame whose last token is i arriving at t is late by
t - (request sent + first_token_delay_s + i / tokens_per_second). That lateness is the request's
way in (client -> router -> worker, once) plus the token's way out (worker -> router -> client).
Router CPU per token is the router process's CPU time over the level divided by the tokens the
clients received. Beside each, the floor: the same streams against bare servers of each front with
no router behind them (bench/grpc_floor.py: grpc.aio, and aiohttp sending the router's SSE
chunks), i.e. what the client, the protocol stack and the shared machine cost on their own.

    python -m bench.http_vs_grpc [--quick]     (also part of `make bench`: python -m bench --only http)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import aiohttp
import grpc
import psutil

from bench import grpc_floor
from bench.pool import PacedPool, PoolSpec, split_cpus
from bench.router_overhead import CHIP_PACE, STREAMS_PER_CONNECTION, CpuMeter, pinned_to
from bench.stats import NS_PER_S, Distribution
from protos import inference_pb2
from protos.inference_pb2_grpc import InferenceServiceStub
from router import event_loop

LEVELS = (1, 16, 64)
FRONTS = ("grpc", "http")
ROUNDS = 4  # requests per stream and front; each: 0.7 s to the first token, then 64 tokens at 10/s
QUICK_ROUNDS = 1
PROMPT = "Tell me a story."
# The client's loop: on the stdlib loop, 64 aiohttp SSE connections cost the client more than the
# router adds (the HTTP floor measured 2-4x slower on it); uvloop keeps the client out of the figures.
CLIENT_EVENT_LOOP = "uvloop"
TARGET_RATIO = 1.5  # issue 10: HTTP within 1.5x of gRPC at 64 streams, latency p50 and CPU per token

Frames = list[tuple[int, int]]  # (receive time ns, tokens so far) per frame


async def grpc_request(stub: InferenceServiceStub) -> tuple[int, Frames]:
    request = inference_pb2.CompletionRequest(history=[inference_pb2.ChatMessage(role=1, content=PROMPT)])
    sent = time.time_ns()
    frames = [(time.time_ns(), frame.token_usage) async for frame in stub.StreamComplete(request)]
    return sent, frames


async def http_request(session: aiohttp.ClientSession, url: str) -> tuple[int, Frames]:
    body = {"messages": [{"role": "user", "content": PROMPT}], "stream": True}
    sent = time.time_ns()
    frames: Frames = []
    tokens = 0
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            text = choices[0].get("delta", {}).get("content") if choices else None
            if text:  # a paced worker's token is one word
                tokens += len(text.split())
                frames.append((time.time_ns(), tokens))
    return sent, frames


def lateness_ms(sent_ns: int, frames: Frames) -> list[float]:
    delay_s, period_s = CHIP_PACE.first_token_delay_s, 1 / CHIP_PACE.tokens_per_second
    return [
        (received - sent_ns) / NS_PER_S * 1000 - (delay_s + (tokens - 1) * period_s) * 1000
        for received, tokens in frames
    ]


class Target(NamedTuple):
    """Where the streams go: the router under test, or the floor servers beside it."""

    addr: str  # gRPC host:port
    http_url: str
    process: psutil.Process  # whose CPU is measured


@dataclass
class Level:
    """What one front measured at one level, over all its rounds."""

    front: str
    through: str  # "router" or "floor"
    streams: int
    samples: list[float] = field(default_factory=list)  # added latency per frame, ms
    tokens: int = 0
    router_cpu_s: float = 0.0
    wall_s: float = 0.0

    def summary(self) -> dict:
        return {
            "front": self.front,
            "through": self.through,
            "streams": self.streams,
            "added_latency_ms": asdict(Distribution.of(self.samples)),
            "tokens": self.tokens,
            "router_cpu_us_per_token": self.router_cpu_s / max(self.tokens, 1) * 1e6,
            "router_cpu_utilisation": self.router_cpu_s / max(self.wall_s, 1e-9),
        }


async def run_round(target: Target, level: Level) -> None:
    """One request on each of level.streams concurrent streams, added to `level`."""
    meter = CpuMeter(target.process)
    front, streams = level.front, level.streams

    async def one_stream(request: object) -> None:
        await asyncio.sleep(random.uniform(0, 1 / CHIP_PACE.tokens_per_second))  # out of lockstep
        sent, frames = await request()  # type: ignore[operator]
        level.samples.extend(lateness_ms(sent, frames))
        level.tokens += frames[-1][1] if frames else 0

    began = time.monotonic()
    if front == "grpc":
        channels = [
            grpc.aio.insecure_channel(target.addr) for _ in range(math.ceil(streams / STREAMS_PER_CONNECTION))
        ]
        stubs = [InferenceServiceStub(channel) for channel in channels]
        await asyncio.gather(
            *(one_stream(lambda i=i: grpc_request(stubs[i % len(stubs)])) for i in range(streams))
        )
        for channel in channels:
            await channel.close()
    else:
        url = f"{target.http_url}/v1/chat/completions"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(*(one_stream(lambda: http_request(session, url)) for _ in range(streams)))
    level.router_cpu_s += meter.seconds()
    level.wall_s += time.monotonic() - began


async def run(rounds: int, scratch: Path) -> dict:
    router_cpus, other_cpus = split_cpus()
    spec = PoolSpec(
        workers=max(LEVELS),
        paced=CHIP_PACE,
        router_cpus=router_cpus,
        worker_cpus=router_cpus | other_cpus,
    )
    levels = []
    with pinned_to(other_cpus), PacedPool(spec, scratch / "http-vs-grpc") as pool:
        target = Target(pool.addr, pool.http_url, pool.router_process())
        for streams in LEVELS:
            levels += await _side_by_side(target, "router", streams, rounds, pool.wait_until_idle)
    floor_server = grpc_floor.FloorServer(CHIP_PACE, router_cpus, scratch / "floor")
    with pinned_to(other_cpus), floor_server as floor:
        assert floor.process is not None
        target = Target(floor.addr, floor.http_url, psutil.Process(floor.process.pid))
        for streams in LEVELS:
            levels += await _side_by_side(target, "floor", streams, rounds, _nothing_to_wait_for)
    return {"pace": asdict(CHIP_PACE), "rounds": rounds, "levels": levels}


async def _side_by_side(
    target: Target, through: str, streams: int, rounds: int, settle: Callable[[], Awaitable[None]]
) -> list[dict]:
    """Both fronts at one level, alternating round by round, so that a change in the machine's
    load (it is shared) falls on both."""
    pair = [Level(front, through, streams) for front in FRONTS]
    for _ in range(rounds):
        for level in pair:
            await run_round(target, level)
            await settle()
    return [level.summary() for level in pair]


async def _nothing_to_wait_for() -> None:
    return None


def format_table(results: dict) -> str:
    by_key = {(level["front"], level["through"], level["streams"]): level for level in results["levels"]}
    lines = [
        "HTTP/SSE vs gRPC at chip pace: added latency per token (ms; floor = a bare server of the same "
        "front, no router), router CPU per token (us)",
        f"{'streams':>7}  {'gRPC p50':>8} {'p99':>7} {'floor':>6}  {'HTTP p50':>8} {'p99':>7} {'floor':>6}"
        f"  {'ratio':>5}  {'gRPC cpu':>8} {'HTTP cpu':>8} {'ratio':>5}",
    ]
    for streams in LEVELS:
        grpc_level, http_level = by_key[("grpc", "router", streams)], by_key[("http", "router", streams)]
        g, h = grpc_level["added_latency_ms"], http_level["added_latency_ms"]
        g_floor = by_key[("grpc", "floor", streams)]["added_latency_ms"]["p50"]
        h_floor = by_key[("http", "floor", streams)]["added_latency_ms"]["p50"]
        g_cpu, h_cpu = grpc_level["router_cpu_us_per_token"], http_level["router_cpu_us_per_token"]
        lines.append(
            f"{streams:>7}  {g['p50']:>8.2f} {g['p99']:>7.2f} {g_floor:>6.2f}  "
            f"{h['p50']:>8.2f} {h['p99']:>7.2f} {h_floor:>6.2f}  {h['p50'] / g['p50']:>5.2f}  "
            f"{g_cpu:>8.1f} {h_cpu:>8.1f} {h_cpu / g_cpu:>5.2f}"
        )
    top = max(LEVELS)
    g, h = by_key[("grpc", "router", top)], by_key[("http", "router", top)]
    latency_ok = h["added_latency_ms"]["p50"] <= TARGET_RATIO * g["added_latency_ms"]["p50"]
    cpu_ok = h["router_cpu_us_per_token"] <= TARGET_RATIO * g["router_cpu_us_per_token"]
    lines.append(
        f"target at {top} streams: HTTP p50 within {TARGET_RATIO}x of gRPC's: "
        f"{'met' if latency_ok else 'MISSED'}; router CPU per token within {TARGET_RATIO}x: "
        f"{'met' if cpu_ok else 'MISSED'}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_vs_grpc", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round (about a minute)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    with tempfile.TemporaryDirectory(prefix="bench-http-") as scratch:
        results = event_loop.run(run(rounds, Path(scratch)), CLIENT_EVENT_LOOP)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
