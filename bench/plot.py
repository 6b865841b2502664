"""PNG plot of the router's added latency per token (p50, p99) against concurrent streams, with the
bare gRPC floor and the targets beside it, and optionally an earlier run's router figures (`--before`)
to show what a change did.

    python -m bench.plot bench/results/latest.json -o bench/latency_vs_streams.png
    python -m bench.plot bench/results/latest.json --before bench/before_optimisation.json -o out.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

from bench import targets


def plot_latency(results: dict, out: Path, before: dict | None = None) -> Path:
    """Draw the "latency" section of a `python -m bench` results document into `out`, with the
    router's figures of an earlier document `before` (same format) beside them if given."""
    latency = _latency(results, "the results")
    figure, axes = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    if before is not None:
        earlier = _latency(before, "the earlier results")["levels"]
        _series(axes, earlier, f"router before ({before.get('started', '')[:16]})", "tab:orange")
    _series(axes, latency["levels"], "router", "tab:blue")
    _series(axes, latency.get("grpc_floor", []), "bare gRPC server (floor)", "tab:gray")
    _target(axes, "p50", targets.ADDED_LATENCY_P50_MS, "tab:green")
    _target(axes, "p99", targets.ADDED_LATENCY_P99_MS, "tab:red")
    streams = [level["streams"] for level in latency["levels"]]
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(streams, [str(count) for count in streams])
    axes.set_xlabel("concurrent streams (10 tokens/s each, paced workers)")
    axes.set_ylabel("added latency per token (ms)")
    axes.set_title("Router added latency: client receive − worker create_time")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out


def _latency(results: dict, what: str) -> dict:
    latency = results.get("router", {}).get("latency")
    if not latency or not latency["levels"]:
        raise ValueError(f"{what} hold no added-latency measurements (scenario `latency`)")
    return latency


def _target(axes: plt.Axes, which: str, bound_ms: float, color: str) -> None:
    axes.axhline(bound_ms, color=color, linestyle=":", linewidth=1)
    label = f"target {which} at {targets.LATENCY_STREAMS} streams: {bound_ms:g} ms"
    axes.annotate(label, (1, bound_ms), textcoords="offset points", xytext=(2, 3), fontsize=8, color=color)


def _series(axes: plt.Axes, levels: list[dict], label: str, color: str) -> None:
    measured = [level for level in levels if level["added_latency_ms"]["count"]]
    if not measured:
        return
    streams = [level["streams"] for level in measured]
    axes.plot(
        streams,
        [level["added_latency_ms"]["p50"] for level in measured],
        marker="o",
        color=color,
        label=f"{label} p50",
    )
    axes.plot(streams, [level["added_latency_ms"]["p99"] for level in measured], marker="s", color=color,
              linestyle="--", label=f"{label} p99")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results JSON written by `python -m bench`")
    parser.add_argument("-o", "--out", type=Path, help="PNG to write (default: beside the results)")
    parser.add_argument("--before", type=Path, help="an earlier results JSON to draw beside (router only)")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text(encoding="utf-8"))
        before = json.loads(args.before.read_text(encoding="utf-8")) if args.before else None
        out = plot_latency(results, args.out or args.results.with_suffix(".png"), before)
    except (OSError, ValueError) as error:
        print(f"plot: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
