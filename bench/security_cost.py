"""What TLS (with an API key) and CURVE cost per token: added latency at 64 streams, side by side.

Four pools of paced workers at chip pace (10 tokens/s, first token after 0.7 s, one worker per
stream), each a real router with real workers on loopback (bench.pool), all up at once:

- plain: no TLS, no key, no CURVE (the loopback default);
- tls+key: the client talks TLS to the gRPC front and sends an API key with every call;
- curve: the worker link is CURVE-encrypted and authenticated;
- tls+key+curve: both, as a multi-host deployment runs.

The client drives one pool at a time for a short window and moves on, cycling through the four in
a rotated order, so that whatever else loads the machine falls on every variant alike. Added
latency per frame = client receive time - Completion.create_time (stamped by the router as it
relays the worker's chunk). CURVE sits before that stamp (worker -> router), so it shows in the
router's CPU, and in latency only as that CPU delays other frames; TLS sits after it. A second
phase, relay, runs 4 workers at 500 tokens/s (the client follows frame by frame) to show the
router's CPU per frame, where encryption's cost stands out of the noise. The router is pinned to
one core, the client and the workers to the others (as in bench.router_overhead).

    python -m bench.security_cost [--streams 64] [--seconds 8] [--cycles 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import trustme

from bench.loadgen import BUILTIN_PROMPTS, LoadSpec, run_load
from bench.pool import PacedPool, PoolSpec, split_cpus
from bench.router_overhead import (
    CHIP_PACE,
    CHIP_TOKEN_PERIOD_S,
    RELAY_PACED_TOKENS_PER_SECOND,
    RELAY_TOKENS_PER_REQUEST,
    STREAMS_PER_CONNECTION,
    CpuMeter,
    pinned_to,
)
from bench.stats import percentile
from common.config import PacedConfig

VARIANTS = ("plain", "tls+key", "curve", "tls+key+curve")
API_KEY = "bench-" + "k" * 40
# Relay: a few workers far faster than a chip, at a pace the client follows frame by frame: the
# router's CPU per frame with and without encryption shows clearly (bench.router_overhead's pace).
RELAY_PACE = PacedConfig(tokens_per_second=RELAY_PACED_TOKENS_PER_SECOND, first_token_delay_s=0.0,
                         tokens_per_request=RELAY_TOKENS_PER_REQUEST)  # fmt: skip
RELAY_STREAMS = 4
WARMUP_S = 1.0  # each window's streams start within it (connections are made before it)
REPO = Path(__file__).resolve().parents[1]
Keys = tuple[dict, dict, grpc.ChannelCredentials]  # TLS + key section, CURVE section, client credentials


def make_keys(folder: Path) -> Keys:
    """(TLS + key security section, CURVE section, client credentials), files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    (folder / "api_keys").write_text(API_KEY + "\n")
    (folder / "api_keys").chmod(0o600)
    for name in ("router", "worker"):
        keygen = [sys.executable, str(REPO / "scripts" / "keygen.py"), "curve", str(folder), name]
        subprocess.run(keygen, check=True, capture_output=True)
    allowed = folder / "allowed"
    allowed.mkdir()
    (allowed / "worker.key").write_bytes((folder / "worker.key").read_bytes())
    front = {
        "tls": {"cert_file": str(folder / "server.pem"), "key_file": str(folder / "server.key")},
        "api_keys_file": str(folder / "api_keys"),
    }
    curve = {
        "enabled": True,
        "router_secret_key": str(folder / "router.key_secret"),
        "allowed_workers_dir": str(allowed),
        "worker_secret_key": str(folder / "worker.key_secret"),
        "router_public_key": str(folder / "router.key"),
    }
    return front, curve, grpc.ssl_channel_credentials(ca.cert_pem.bytes())


@dataclass
class Variant:
    name: str
    pool: PacedPool
    call: dict  # run_load's credentials and metadata
    delays_ms: list[float] = field(default_factory=list)
    frames: int = 0  # every frame the client received, warm-up included (as the CPU time is)
    router_cpu_s: float = 0.0
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Phase:
    name: str
    paced: PacedConfig
    streams: int  # one worker per stream


def pool_spec(name: str, keys: Keys, phase: Phase) -> tuple[PoolSpec, dict]:
    front, curve, credentials = keys
    tls = "tls" in name
    security = {**(front if tls else {}), **({"curve": curve} if "curve" in name else {})}
    router_cpus, other_cpus = split_cpus()
    spec = PoolSpec(
        workers=phase.streams,
        paced=phase.paced,
        router_cpus=router_cpus,
        worker_cpus=other_cpus,
        security=security or None,
        client_credentials=credentials if tls else None,
    )
    call = {"credentials": credentials, "metadata": (("authorization", f"Bearer {API_KEY}"),)} if tls else {}
    return spec, call


async def window(variant: Variant, streams: int, seconds: float) -> None:
    """One measured window on one pool: fresh streams, latency counted after the warm-up."""
    load = LoadSpec(
        concurrency=streams,
        duration_s=seconds + WARMUP_S,
        cancel_at_end=True,
        channels=-(-streams // STREAMS_PER_CONNECTION),
        ramp_s=CHIP_TOKEN_PERIOD_S,
    )
    meter = CpuMeter(variant.pool.router_process())
    run = await run_load(variant.pool.addr, load, BUILTIN_PROMPTS, **variant.call)
    variant.router_cpu_s += meter.seconds()
    variant.seconds += seconds + WARMUP_S
    warm_ns = run.started_ns + int(WARMUP_S * 1e9)
    variant.delays_ms.extend(
        (recv - created) / 1e6
        for record in run.records
        for recv, created in zip(record.recv_ns, record.create_ns, strict=True)
        if recv >= warm_ns
    )
    variant.frames += sum(len(record.recv_ns) for record in run.records)
    for status, count in run.report().by_status.items():
        variant.statuses[status] = variant.statuses.get(status, 0) + count
    await variant.pool.wait_until_idle()


async def run_phase(phase: Phase, keys: Keys, seconds: float, cycles: int, scratch: Path) -> list[dict]:
    """All four pools up at once; windows interleaved, each cycle in a rotated order, so that the
    machine's load at any moment falls on every variant alike."""
    with contextlib.ExitStack() as stack:
        variants = []
        for name in VARIANTS:
            spec, call = pool_spec(name, keys, phase)
            folder = scratch / f"{phase.name}-{name.replace('+', '-')}"
            variants.append(Variant(name, stack.enter_context(PacedPool(spec, folder)), call))
        load_before = os.getloadavg()
        with pinned_to(split_cpus()[1]):
            for cycle in range(cycles):
                for variant in variants[cycle % len(variants) :] + variants[: cycle % len(variants)]:
                    await window(variant, phase.streams, seconds)
        load_after = os.getloadavg()
    results = [summary(phase, variant, load_before, load_after) for variant in variants]
    for result in results:
        print(_row(result), flush=True)
    return results


async def run(streams: int, seconds: float, cycles: int) -> list[dict]:
    phases = (Phase("latency", CHIP_PACE, streams), Phase("relay", RELAY_PACE, RELAY_STREAMS))
    with tempfile.TemporaryDirectory(prefix="bm-security-bench-") as scratch:
        keys = make_keys(Path(scratch) / "keys")
        results = []
        for phase in phases:
            results += await run_phase(phase, keys, seconds, cycles, Path(scratch))
        return results


def summary(phase: Phase, variant: Variant, load_before: tuple, load_after: tuple) -> dict:
    return {
        "phase": phase.name,
        "variant": variant.name,
        "streams": phase.streams,
        "tokens_per_second_per_worker": phase.paced.tokens_per_second,
        "frames_measured": len(variant.delays_ms),
        "added_latency_ms": {
            "p50": percentile(variant.delays_ms, 50),
            "p90": percentile(variant.delays_ms, 90),
            "p99": percentile(variant.delays_ms, 99),
        },
        "router_cpu_utilisation": variant.router_cpu_s / variant.seconds,
        "router_cpu_us_per_frame": variant.router_cpu_s / max(variant.frames, 1) * 1e6,
        "requests_by_status": variant.statuses,
        "load_average_1m_before_after": [load_before[0], load_after[0]],
    }


def _row(result: dict) -> str:
    latency = result["added_latency_ms"]
    return (
        f"{result['phase']:<8} {result['variant']:<14} added latency p50 {latency['p50']:6.2f} ms  "
        f"p90 {latency['p90']:6.2f} ms  p99 {latency['p99']:6.2f} ms  "
        f"router CPU {result['router_cpu_utilisation']:5.1%}, "
        f"{result['router_cpu_us_per_frame']:5.0f} us/frame  "
        f"frames {result['frames_measured']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.security_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured part of one window")
    parser.add_argument("--cycles", type=int, default=4, help="windows per variant, interleaved")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.streams, args.seconds, args.cycles))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
