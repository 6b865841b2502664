"""What TLS (with an API key) and CURVE cost per token: added latency at 64 streams, side by side.

Four pools of paced workers at chip pace (10 tokens/s, first token after 0.7 s, one worker per
stream), each a real router and real workers on loopback (bench.pool), measured one after another
in one run and then again in the reverse order (drift on a shared machine shows as a difference
between the two rounds):

- plain: no TLS, no key, no CURVE (the loopback default);
- tls+key: the client talks TLS 1.3 to the gRPC front and sends an API key with every call;
- curve: the worker link is CURVE-encrypted and authenticated;
- tls+key+curve: both, as a multi-host deployment runs.

Added latency per frame = client receive time - Completion.create_time (stamped by the router as it
relays the worker's chunk); CURVE sits before that stamp (worker -> router), so its cost shows in
the router's CPU, and in latency only when that CPU saturates; TLS sits after it (router -> client).
The router is pinned to one core, the client and the workers to the others (as in
bench.router_overhead).

    python -m bench.security_cost [--streams 64] [--seconds 15] [--rounds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc
import trustme

from bench.loadgen import BUILTIN_PROMPTS, LoadSpec, run_load
from bench.pool import PacedPool, PoolSpec, split_cpus
from bench.router_overhead import CHIP_PACE, CHIP_TOKEN_PERIOD_S, STREAMS_PER_CONNECTION, CpuMeter, pinned_to
from bench.stats import percentile

VARIANTS = ("plain", "tls+key", "curve", "tls+key+curve")
API_KEY = "bench-" + "k" * 40
WARMUP_S = 3.0  # past the first token of every stream
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


async def measure(variant: str, keys: Keys, streams: int, seconds: float, scratch: Path) -> dict:
    front, curve, credentials = keys
    tls = "tls" in variant
    security = {**(front if tls else {}), **({"curve": curve} if "curve" in variant else {})}
    router_cpus, other_cpus = split_cpus()
    spec = PoolSpec(
        workers=streams,
        paced=CHIP_PACE,
        router_cpus=router_cpus,
        worker_cpus=other_cpus,
        security=security or None,
        client_credentials=credentials if tls else None,
    )
    load = LoadSpec(
        concurrency=streams,
        duration_s=seconds + WARMUP_S,
        cancel_at_end=True,
        channels=-(-streams // STREAMS_PER_CONNECTION),
        ramp_s=CHIP_TOKEN_PERIOD_S,
    )
    call = {"credentials": credentials, "metadata": (("authorization", f"Bearer {API_KEY}"),)} if tls else {}
    with PacedPool(spec, scratch) as pool, pinned_to(other_cpus):
        meter = CpuMeter(pool.router_process())
        run = await run_load(pool.addr, load, BUILTIN_PROMPTS, **call)
        router_cpu = meter.utilisation()
    warm_ns = run.started_ns + int(WARMUP_S * 1e9)
    delays_ms = [
        (recv - created) / 1e6
        for record in run.records
        for recv, created in zip(record.recv_ns, record.create_ns, strict=True)
        if recv >= warm_ns
    ]
    report = run.report()
    return {
        "variant": variant,
        "streams": streams,
        "frames_measured": len(delays_ms),
        "added_latency_ms": {"p50": percentile(delays_ms, 50), "p99": percentile(delays_ms, 99)},
        "router_cpu_utilisation": router_cpu,
        "requests_by_status": report.by_status,
    }


async def run(streams: int, seconds: float, rounds: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bm-security-bench-") as scratch:
        keys = make_keys(Path(scratch) / "keys")
        for round_number in range(rounds):
            order = VARIANTS if round_number % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                folder = Path(scratch) / f"{round_number}-{variant.replace('+', '-')}"
                result = await measure(variant, keys, streams, seconds, folder)
                result["round"] = round_number + 1
                print(_row(result), flush=True)
                results.append(result)
    return results


def _row(result: dict) -> str:
    latency = result["added_latency_ms"]
    return (
        f"round {result['round']}  {result['variant']:<14} p50 {latency['p50']:7.2f} ms  "
        f"p99 {latency['p99']:7.2f} ms  router CPU {result['router_cpu_utilisation']:5.1%}  "
        f"frames {result['frames_measured']}  {result['requests_by_status']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.security_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.streams, args.seconds, args.rounds))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
