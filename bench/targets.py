"""The router's targets (issue 5) and how measured results compare with them.

Targets are reached by optimisation and shown by the benchmark; tests never assert them.
"""

from __future__ import annotations

from dataclasses import dataclass

LATENCY_STREAMS = 64
ADDED_LATENCY_P50_MS = 0.5
ADDED_LATENCY_P99_MS = 2.0
RELAY_FRAMES_PER_S = 25_000
EFFICIENCY_WORKERS = 128
POOL_EFFICIENCY = 0.99
QUEUED_REQUESTS = 1000
ROUTER_RSS_MB = 150


@dataclass(frozen=True)
class Verdict:
    what: str
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


def evaluate(results: dict) -> list[Verdict]:
    """Compare a `python -m bench` results document (its "router" section) with the targets."""
    router = results.get("router", {})
    return [
        *_latency(router.get("latency")),
        *_relay(router.get("relay")),
        *_efficiency(router.get("efficiency")),
        *_memory(router.get("memory")),
    ]


def _latency(latency: dict | None) -> list[Verdict]:
    level = _level(latency, "streams", LATENCY_STREAMS)
    what = f"added latency per token @{LATENCY_STREAMS} streams"
    if level is None:
        return [Verdict(f"{what}, p50", f"<= {ADDED_LATENCY_P50_MS} ms", "-", None)]
    delay = level["added_latency_ms"]
    return [
        Verdict(f"{what}, p50", f"<= {ADDED_LATENCY_P50_MS} ms", f"{delay['p50']:.2f} ms",
                delay["p50"] <= ADDED_LATENCY_P50_MS),
        Verdict(f"{what}, p99", f"<= {ADDED_LATENCY_P99_MS} ms", f"{delay['p99']:.2f} ms",
                delay["p99"] <= ADDED_LATENCY_P99_MS),
    ]  # fmt: skip


def _relay(relay: dict | None) -> list[Verdict]:
    target = f">= {RELAY_FRAMES_PER_S:,}"
    if relay is None:
        return [Verdict("chunks relayed per second, one core", target, "-", None)]
    flat, paced = relay["flat_out"], relay["one_frame_per_chunk"]
    floor = relay.get("grpc_floor_one_frame_per_chunk")
    floor_note = ""
    if floor and floor["frames_per_server_cpu_s"]:
        floor_note = f"; a bare gRPC server: {floor['frames_per_server_cpu_s']:,.0f} per CPU-s"
    return [
        _per_core("chunks relayed per second, one core, flat out", flat, "chunks_per_router_cpu_s"),
        _per_core(
            "frames relayed per second, one core, 1 chunk/frame", paced, "chunks_per_router_cpu_s", floor_note
        ),
    ]


def _per_core(what: str, run: dict, key: str, note: str = "") -> Verdict:
    target = f">= {RELAY_FRAMES_PER_S:,}"
    capacity = run[key]
    if capacity is None:
        return Verdict(what, target, "-", None)
    measured = (
        f"{capacity:,.0f} per router CPU-s ({run['chunks_per_s']:,.0f} chunks/s in "
        f"{run['frames_per_s']:,.0f} frames/s at {run['router_cpu_utilisation']:.0%} router CPU{note})"
    )
    return Verdict(what, target, measured, capacity >= RELAY_FRAMES_PER_S)


def _efficiency(efficiency: dict | None) -> list[Verdict]:
    level = _level(efficiency, "workers", EFFICIENCY_WORKERS)
    what = f"pool efficiency @{EFFICIENCY_WORKERS} workers"
    if level is None:
        return [Verdict(what, f">= {POOL_EFFICIENCY:.0%}", "-", None)]
    idle = level["router_samples_idle_while_queued"]
    measured = (
        f"{idle} of {level['router_state_samples']} router samples; client side "
        f"{level['idle_while_queued']} dispatch gaps > {level['idle_threshold_ms']:g} ms "
        f"(p50 {level['dispatch_gap_ms']['p50']:.1f}, p99 {level['dispatch_gap_ms']['p99']:.1f} ms)"
    )
    return [
        Verdict(what, f">= {POOL_EFFICIENCY:.0%}", f"{level['efficiency']:.2%}",
                level["efficiency"] >= POOL_EFFICIENCY),
        Verdict(f"worker idle while queue non-empty @{EFFICIENCY_WORKERS}", "0", measured, idle == 0),
    ]  # fmt: skip


def _memory(memory: dict | None) -> list[Verdict]:
    what, target = f"router RSS with {QUEUED_REQUESTS:,} queued", f"<= {ROUTER_RSS_MB} MB"
    if memory is None:
        return [Verdict(what, target, "-", None)]
    rss = memory["rss_queued_mb"]
    what = f"router RSS with {memory['queued']:,} queued"
    return [Verdict(what, target, f"{rss:.1f} MB", rss <= ROUTER_RSS_MB)]


def _level(section: dict | None, key: str, value: int) -> dict | None:
    if section is None:
        return None
    return next((level for level in section["levels"] if level[key] == value), None)


def format_table(verdicts: list[Verdict]) -> str:
    width = max(len(verdict.what) for verdict in verdicts) + 2
    lines = [f"{'target':{width}}{'wanted':>12}  measured"]
    for verdict in verdicts:
        mark = {True: "met", False: "MISSED", None: "not measured"}[verdict.met]
        lines.append(f"{verdict.what:{width}}{verdict.target:>12}  {verdict.measured}  [{mark}]")
    return "\n".join(lines)
