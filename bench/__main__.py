"""`python -m bench` (`make bench`): the router-overhead suite, the CPU engine benchmark and the
multi-turn KV-reuse benchmark (bench/multiturn.py).

Writes bench/results/bench-<time>.json (and latest.json), a plot of added latency against
concurrency beside it, and prints the figures with the targets of issue 5.

    python -m bench                    # everything, full windows (about 10 minutes on 2 cores)
    python -m bench --quick            # short windows, fewer levels (about a minute, plus the engine)
    python -m bench --only latency,relay --profile 8
    python -m bench --only http        # the HTTP/SSE front beside gRPC (bench/http_vs_grpc.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from bench import http_vs_grpc, multiturn, plot, router_overhead, targets
from bench.engine import run_engine_benchmark
from router import event_loop

ENGINE = "engine"
HTTP = "http"  # the HTTP/SSE front beside gRPC
MULTITURN = "multiturn"


def machine() -> dict:
    """What the figures were measured on."""
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "ram_gb": round(psutil.virtual_memory().total / (1 << 30), 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average": os.getloadavg(),
        "commit": _commit(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str | None:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=router_overhead.RESULTS_DIR.parent,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    return completed.stdout.strip() or None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    router_overhead.add_arguments(parser, (*router_overhead.SCENARIOS, HTTP, ENGINE, MULTITURN))
    parser.add_argument("--engine-args", default="", help="arguments for scripts/bench_engine.py")
    parser.add_argument("--plot", type=Path, help="also write the latency plot here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    known = (*router_overhead.SCENARIOS, HTTP, ENGINE, MULTITURN)
    if not names or not set(names) <= set(known):
        print(f"bench: --only takes names from {', '.join(known)}; got {args.only!r}", file=sys.stderr)
        return 2
    run_engine = ENGINE in names
    run_http = HTTP in names
    run_multiturn = MULTITURN in names
    args.only = ",".join(name for name in names if name not in (ENGINE, HTTP, MULTITURN))
    try:
        settings, scenarios = router_overhead.settings_from_args(args) if args.only else (None, [])
    except ValueError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine()}
    if scenarios:
        results["router"] = asyncio.run(router_overhead.run_suite(settings, scenarios, args.artifacts))
    if run_http:
        print("HTTP/SSE vs gRPC ...", file=sys.stderr, flush=True)
        rounds = http_vs_grpc.QUICK_ROUNDS if args.quick else http_vs_grpc.ROUNDS
        with tempfile.TemporaryDirectory(prefix="bench-http-") as scratch:
            results[HTTP] = event_loop.run(
                http_vs_grpc.run(rounds, Path(scratch)), http_vs_grpc.CLIENT_EVENT_LOOP
            )
    if run_engine:
        print("engine benchmark ...", file=sys.stderr, flush=True)
        results[ENGINE] = run_engine_benchmark(args.engine_args.split())
    if run_multiturn:
        results[MULTITURN] = multiturn.run(multiturn.POOLS, args.quick, args.artifacts / MULTITURN)
    results["load_average_after"] = os.getloadavg()
    written = _write(results, args.artifacts, args.plot)
    if "router" in results:
        print(targets.format_table(targets.evaluate(results)))
    if run_http:
        print(http_vs_grpc.format_table(results[HTTP]))
    if run_engine:
        print(results[ENGINE]["output"].rstrip())
    for summary in results.get(MULTITURN, {}).values():
        print(multiturn.format_summary(summary))
    print("\n".join(f"wrote {path}" for path in written))
    return 0


def _write(results: dict, folder: Path, extra_plot: Path | None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    document = json.dumps(results, indent=2) + "\n"
    paths = [folder / f"bench-{stamp}.json", folder / "latest.json"]
    for path in paths:
        path.write_text(document, encoding="utf-8")
    if "latency" in results.get("router", {}):
        paths.append(plot.plot_latency(results, folder / f"bench-{stamp}.png"))
        if extra_plot is not None:
            paths.append(plot.plot_latency(results, extra_plot))
    return paths


if __name__ == "__main__":
    sys.exit(main())
