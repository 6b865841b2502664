"""Multi-turn chat load with KV reuse on and off, side by side in one run (issue 13).

Each user opens with a long first message (a document and a question, ~1,100-1,300 tokens) and asks
short follow-ups, so the history grows to ~1,500-1,800 tokens by turn 6; every turn sends the whole
conversation, as chat clients do. Users run concurrently, one turn after the other (closed loop).
For every mode the same conversations run against a fresh pool (supervisor, router and workers as
real processes on loopback) and the figures are time to first token (client side) per turn number,
prompt tokens computed vs served from the KV cache (the router's metrics) and cache-aware
dispatches. Modes:

- off:   model.reuse_kv false, router.cache_aware false (every turn prefilled from token 0);
- lru:   reuse on in the workers, dispatch least recently used (a turn finds its cache by chance);
- on:    reuse and cache-aware dispatch (the defaults).

Pools: `numpy` (the default model SmolLM2-135M on the CPU, greedy: answers compared between modes)
and `paced` (workers that model a chip: prefill_tokens_per_second per prompt token computed, then
tokens_per_second; echo answers). `saturated` runs more users than paced workers without prefill
cost, to show cache-aware dispatch keeps the pool as busy as LRU does (tokens/s, wall time).

    python -m bench.multiturn                   # all three pools (~5 min on 2 cores)
    python -m bench.multiturn --quick           # fewer turns, shorter documents (~1 min)
    python -m bench.multiturn --only paced --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.pool import REPO_ROOT, free_port
from bench.stats import percentile
from protos import inference_pb2 as api
from protos import inference_pb2_grpc
from router.metrics import NAMESPACE

USER, ASSISTANT = 1, 2
MODES = {"off": (False, False), "lru": (True, False), "on": (True, True)}  # (reuse_kv, cache_aware)
POOLS = ("numpy", "paced", "saturated")
START_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 600.0
SYSTEM = "You are a careful assistant. Answer questions about the document the user gives you."
_WORDS = ("river", "harbour", "engine", "ledger", "window", "orchard", "signal", "copper", "meadow",
          "lantern", "bridge", "archive", "compass", "garden", "market", "thunder", "velvet", "marble",
          "canyon", "falcon", "pepper", "quartz", "saddle", "timber", "voyage", "whistle")  # fmt: skip
# Users read an answer before the next turn: a pause drawn per (user, turn), the same in every mode,
# so users fall out of step (in lockstep, LRU would hand every user the same worker each turn).
MAX_THINK_S = 2.0


@dataclass(frozen=True)
class Scenario:
    pool: str
    users: int
    turns: int
    workers: int
    document_words: int
    question_words: int
    max_new_tokens: int
    modes: tuple[str, ...]


@dataclass
class ModeResult:
    ttft_s: dict[int, list[float]] = field(default_factory=dict)  # by turn number (1-based)
    answers: dict[tuple[int, int], str] = field(default_factory=dict)  # (user, turn) -> text
    wall_s: float = 0.0
    completion_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def scenarios(quick: bool) -> dict[str, Scenario]:
    turns = 3 if quick else 6
    words = 250 if quick else 700
    every = tuple(MODES)
    return {
        # Two CPU cores: one numpy worker on each, one user per worker (queueing would hide prefill).
        # SmolLM2's tokenizer makes ~1 token of each word: a longer document reaches ~1,500 tokens.
        "numpy": Scenario("numpy", 2, turns, 2, words * 5 // 3, 30, 24, ("off", "on")),
        "paced": Scenario("paced", 8, turns, 8, words, 30, 24, every),
        "saturated": Scenario("saturated", 16, turns, 4, words // 4, 10, 16, ("lru", "on")),
    }


def conversation_text(user: int, words: int, seed: int) -> str:
    rng = random.Random(seed * 1000 + user)
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def question(user: int, turn: int, scenario: Scenario) -> str:
    if turn == 1:
        document = conversation_text(user, scenario.document_words, 1)
        return f"Here is a document:\n{document}\nWhich word comes first in it?"
    return f"Question {turn}: " + conversation_text(user * 31 + turn, scenario.question_words, 2) + "?"


def pool_config(scenario: Scenario, mode: str, grpc_port: int, zmq_port: int, metrics_port: int) -> dict:
    reuse_kv, cache_aware = MODES[mode]
    model: dict = {"context_size": 2048, "reuse_kv": reuse_kv}
    if scenario.pool == "numpy":
        model |= {"engine": "numpy", "path": "builtin:smollm2", "threads": 1}
    else:
        prefill = 620.0 if scenario.pool == "paced" else 0.0  # Qwen-7B on a BM1684X: 2048 tokens in 3.3 s
        model |= {
            "name": "paced",
            "engine": "paced",
            "paced": {
                "tokens_per_second": 10.0,
                "first_token_delay_s": 0.05,
                "tokens_per_request": 100000,
                "echo": True,
                "prefill_tokens_per_second": prefill,
            },
        }
    model["defaults"] = {
        "temperature": 0.0,
        "repetition_penalty": 1.0,
        "max_new_tokens": scenario.max_new_tokens,
    }
    return {
        "router": {
            "listen": f"127.0.0.1:{grpc_port}",
            "zmq_bind": f"tcp://127.0.0.1:{zmq_port}",
            "metrics_listen": f"127.0.0.1:{metrics_port}",
            "cache_aware": cache_aware,
            "queue_timeout_s": CALL_TIMEOUT_S,
            # CPU workers on a crowded 2-core machine can be starved for seconds: no false losses.
            "liveness": 10,
        },
        "model": model,
        "workers": {"devices": list(range(scenario.workers)), "per_device": 1},
    }


class ChatPool:
    """`with ChatPool(config, scratch):` python -m supervisor, until every worker is registered."""

    def __init__(self, config: dict, scratch: Path, workers: int) -> None:
        self.config, self.scratch, self.workers = config, scratch, workers
        self.addr = config["router"]["listen"]
        self.metrics_url = f"http://{config['router']['metrics_listen']}/metrics"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ChatPool:
        self.scratch.mkdir(parents=True, exist_ok=True)
        path = self.scratch / "pool.yaml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False), encoding="utf-8")
        with (self.scratch / "pool.log").open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "--config", str(path)],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._registered() < self.workers:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                tail = (self.scratch / "pool.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the pool did not come up; its log ends:\n{tail}")
            time.sleep(0.2)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def counters(self) -> dict[str, float]:
        """The router's KV-reuse counters (and the dispatch matches)."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name.removeprefix(f"{NAMESPACE}_")
                if name in (
                    "prompt_tokens_total",
                    "prompt_tokens_cached_total",
                    "prompt_tokens_computed_total",
                ):
                    values[name.removesuffix("_total")] = sample.value
                elif name == "cache_dispatches_total":
                    values[f"dispatch_{sample.labels['match']}"] = sample.value
        return values

    def _registered(self) -> int:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return 0
        return sum(
            1
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == f"{NAMESPACE}_worker_state"
            and sample.labels["state"] == "idle"
            and sample.value
        )


async def run_users(addr: str, scenario: Scenario) -> ModeResult:
    result = ModeResult()
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        started = time.monotonic()
        await asyncio.gather(*(_user(stub, user, scenario, result) for user in range(scenario.users)))
        result.wall_s = time.monotonic() - started
    return result


async def _user(
    stub: inference_pb2_grpc.InferenceServiceStub, user: int, scenario: Scenario, result: ModeResult
) -> None:
    history: list[api.ChatMessage] = []
    for turn in range(1, scenario.turns + 1):
        await asyncio.sleep(random.Random(user * 100 + turn).uniform(0, MAX_THINK_S))
        history.append(api.ChatMessage(role=USER, content=question(user, turn, scenario)))
        request = api.CompletionRequest(system_message=SYSTEM, history=history)
        sent = time.monotonic()
        first: float | None = None
        parts: list[str] = []
        tokens = 0
        async for frame in stub.StreamComplete(request, timeout=CALL_TIMEOUT_S):
            if first is None and frame.token_usage:
                first = time.monotonic() - sent
            parts.append(frame.output_text)
            tokens = frame.token_usage
        answer = "".join(parts)
        result.ttft_s.setdefault(turn, []).append(first if first is not None else time.monotonic() - sent)
        result.answers[(user, turn)] = answer
        result.completion_tokens += tokens
        history.append(api.ChatMessage(role=ASSISTANT, content=answer))


def run_scenario(scenario: Scenario, scratch: Path) -> dict[str, ModeResult]:
    results = {}
    for mode in scenario.modes:
        print(f"multiturn: {scenario.pool} pool, reuse {mode} ...", file=sys.stderr, flush=True)
        config = pool_config(scenario, mode, free_port(), free_port(), free_port())
        with ChatPool(config, scratch / f"{scenario.pool}-{mode}", scenario.workers) as pool:
            result = asyncio.run(run_users(pool.addr, scenario))
            result.metrics = pool.counters()
        results[mode] = result
    return results


def summarize(scenario: Scenario, results: dict[str, ModeResult]) -> dict:
    modes = {}
    for mode, result in results.items():
        modes[mode] = {
            "ttft_s_by_turn": {
                turn: {"p50": percentile(values, 50), "p90": percentile(values, 90)}
                for turn, values in sorted(result.ttft_s.items())
            },
            "wall_s": result.wall_s,
            "completion_tokens_per_s": result.completion_tokens / result.wall_s if result.wall_s else 0.0,
            **result.metrics,
        }
    summary: dict = {"scenario": scenario.__dict__, "modes": modes}
    if "off" in results and "on" in results:
        summary["answers_identical"] = results["off"].answers == results["on"].answers
        ratios = [
            modes["off"]["ttft_s_by_turn"][turn]["p50"] / modes["on"]["ttft_s_by_turn"][turn]["p50"]
            for turn in modes["on"]["ttft_s_by_turn"]
            if turn >= 3
        ]
        summary["ttft_p50_ratio_turns_3_plus_min"] = min(ratios) if ratios else None
    return summary


def format_summary(summary: dict) -> str:
    scenario = summary["scenario"]
    modes = summary["modes"]
    shape = f"{scenario['users']} users x {scenario['turns']} turns on {scenario['workers']} workers"
    lines = [f"\n{scenario['pool']}: {shape}; time to first token p50 / p90 (s) per turn"]
    names = list(modes)
    lines.append("turn  " + "".join(f"{name:>20}" for name in names))
    for turn in modes[names[0]]["ttft_s_by_turn"]:
        figures = [modes[name]["ttft_s_by_turn"][turn] for name in names]
        cells = "".join(f"{figure['p50']:>10.3f} /{figure['p90']:>7.3f}" for figure in figures)
        lines.append(f"{turn:>4}  {cells}")
    for label, key in (
        ("prompt tokens computed", "prompt_tokens_computed"),
        ("prompt tokens from cache", "prompt_tokens_cached"),
        ("dispatches to a holder", "dispatch_prefix"),
        ("wall time (s)", "wall_s"),
        ("tokens/s (answers)", "completion_tokens_per_s"),
    ):
        lines.append(f"{label:<26}" + "".join(f"{modes[name].get(key, 0):>14.0f}" for name in names))
    if "answers_identical" in summary:
        lines.append(f"answers identical off vs on: {summary['answers_identical']}")
        ratio = summary["ttft_p50_ratio_turns_3_plus_min"]
        if ratio is not None:
            lines.append(f"TTFT p50 off/on, turns >= 3, smallest: {ratio:.1f}x (target >= 5x)")
    return "\n".join(lines)


def run(names: Sequence[str], quick: bool, scratch: Path) -> dict:
    chosen = scenarios(quick)
    return {name: summarize(chosen[name], run_scenario(chosen[name], scratch)) for name in names}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multiturn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(POOLS), help=f"pools among {', '.join(POOLS)}")
    parser.add_argument("--quick", action="store_true", help="3 turns, shorter documents")
    parser.add_argument("--scratch", type=Path, default=REPO_ROOT / "bench" / "results" / "multiturn")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    if not names or not set(names) <= set(POOLS):
        print(f"multiturn: --only takes names from {', '.join(POOLS)}; got {args.only!r}", file=sys.stderr)
        return 2
    results = run(names, args.quick, args.scratch)
    for summary in results.values():
        print(format_summary(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
