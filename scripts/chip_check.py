"""First-boot self-check of a BM1684X box: the SDK, the bmodel's graphs, greedy answers, recovery, speed.

    python scripts/chip_check.py --config configs/bm1684x.yaml [--dev-id 0 --dev-id 1,2 ...]
                                 [--expect tokens.json | --record tokens.json]

For operators who have the chip. Step by step, each printed with its result:
1. the SDK: sophon-sail's version and whether it has the view constructor the adapter needs (>= 3.9.1);
2. the bmodel on the first device group: each graph's addr mode, static/dynamic, shapes and dtypes,
   then the adapter's own checks (equal lengths and dtypes across embedding, blocks, KV and head);
3. a fixed prompt (sophon-demo's own benchmark input) answered greedily: the tokens, compared with a
   reference file when given (`--expect`, e.g. tokens recorded from sophon-demo's qwen.py on the same
   prompt: a JSON list of ids, or this script's own `--record` output);
4. a failure forced mid-generation, then the reset: every layer's KV cache read back from the device
   must be zero, and the next answer must equal the fresh one;
5. a second device group loaded in the same process beside the first, answering the same tokens,
   then both released;
6. time to first token and decode tokens/s of every device group beside sophon-demo's published figures.
Exit status: 0 everything passed; 1 a check failed (each failure says why); 2 no sophon-sail.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from common.config import ConfigError, ModelConfig, load_config
from common.devices import DeviceGroup, DeviceGroupError, format_group, parse_group
from worker.core.driver import Generation
from worker.core.llm_engine import LLMEngine
from worker.core.request import USER, ChatRequest, EngineError, FinishReason, SamplingParams, Turn
from worker.core.sail_graphs import (
    MIN_SAIL_VERSION,
    SailGraphs,
    SailNotInstalledError,
    has_view_overload,
    import_sail,
    sail_version,
)
from worker.core.sail_layout import graph_table
from worker.core.tokenizer import Tokenizer, load_tokenizer

# sophon-demo sample/Qwen README, "程序性能测试" (input "请使用C++写一段冒泡排序算法。"), SE7-32 (BM1684X),
# the range over the README's revisions. The older download named the same seq512 model without "seq512".
SOPHON_DEMO_PROMPT = "请使用C++写一段冒泡排序算法。"
SYSTEM_MESSAGE = "You are a helpful assistant."
FAULT_AT_DECODE_STEP = 3  # the forced failure: this decode step's first layer raises


@dataclass(frozen=True)
class Published:
    first_token_s: tuple[float, float]
    tokens_per_s: tuple[float, float]
    seq_len: int


_QWEN_7B_INT4 = Published(first_token_s=(0.68, 0.74), tokens_per_s=(9.4, 9.8), seq_len=512)
PUBLISHED = {
    "qwen-7b_int4_seq512_1dev.bmodel": _QWEN_7B_INT4,
    "qwen-7b_int4_1dev.bmodel": _QWEN_7B_INT4,
}


class CheckFailed(Exception):
    """One check did not pass; the message says why."""


@dataclass(frozen=True)
class Answer:
    tokens: list[int]
    finish: FinishReason | None
    first_token_s: float
    decode_tokens_per_s: float | None  # None: nothing decoded after the first token


@dataclass(frozen=True)
class SpeedRow:
    group: str
    load_s: float
    answer: Answer


class Check:
    """The checks on one model; `failures` collects every reason, the run goes on where it can."""

    def __init__(self, model: ModelConfig, tokenizer: Tokenizer, prompt: str, max_new_tokens: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        history = (Turn(USER, prompt),)
        self.request = ChatRequest(
            SYSTEM_MESSAGE, history, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        )
        self.prompt_ids = tokenizer.encode_prompt(tokenizer.chat_template.render(SYSTEM_MESSAGE, history))
        self.failures: list[str] = []

    def step(self, title: str) -> _Step:
        return _Step(self, title)

    def answer(self, graphs: SailGraphs) -> Answer:
        """The prompt answered greedily, token ids as the driver yields them, timed."""
        started = time.perf_counter()
        first = None
        generation = Generation(
            graphs,
            self.prompt_ids,
            lambda logits, _tokens: int(np.argmax(logits)),
            self.max_new_tokens,
            self.tokenizer.eos_token_ids,
            threading.Event(),
            greedy=True,
        )
        tokens = []
        for token in generation:
            tokens.append(token)
            if first is None:
                first = time.perf_counter()
        finished = time.perf_counter()
        if first is None:
            return Answer(tokens, generation.finish_reason, finished - started, None)
        decoded = len(tokens) - 1
        rate = decoded / (finished - first) if decoded and finished > first else None
        return Answer(tokens, generation.finish_reason, first - started, rate)


class _Step:
    """`with check.step("title"):` prints the title, then ok or FAILED with the reason."""

    def __init__(self, check: Check, title: str) -> None:
        self._check, self._title = check, title

    def __enter__(self) -> _Step:
        print(f"- {self._title}", flush=True)
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, _traceback: object) -> bool:
        if error is None:
            print("  ok", flush=True)
            return False
        if not isinstance(error, Exception):
            return False
        reason = str(error) if isinstance(error, CheckFailed) else f"{type(error).__name__}: {error}"
        print(f"  FAILED: {reason}", flush=True)
        self._check.failures.append(f"{self._title}: {reason}")
        return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/chip_check.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", required=True, help="pool config with a sail model, e.g. configs/bm1684x.yaml"
    )
    parser.add_argument(
        "--dev-id",
        action="append",
        help="device id or group (0,1) to check (repeatable; default: workers.devices)",
    )
    parser.add_argument(
        "--prompt", default=SOPHON_DEMO_PROMPT, help="user turn (default: sophon-demo's input)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    references = parser.add_mutually_exclusive_group()
    references.add_argument("--expect", type=Path, help="reference greedy tokens to compare with (JSON)")
    references.add_argument("--record", type=Path, help="write this run's greedy tokens there (JSON)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sail = import_sail()
    except SailNotInstalledError as error:
        print(f"chip_check: {error}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        groups = (
            [parse_group(text) for text in args.dev_id]
            if args.dev_id
            else list(map(parse_group, config.workers.groups))
        )
        model = config.model
        if model.engine != "sail" or model.tokenizer is None:
            raise ConfigError("model", f"engine {model.engine!r}: this checks a sail bmodel with a tokenizer")
        tokenizer = load_tokenizer(model.tokenizer)
    except (ConfigError, DeviceGroupError, OSError, ValueError) as error:
        print(f"chip_check: {args.config}: {error}", file=sys.stderr)
        return 1
    check = Check(model, tokenizer, args.prompt, args.max_new_tokens)
    print(f"chip check: {model.path} on device groups {', '.join(map(format_group, groups))}")
    print(
        f"prompt {args.prompt!r} ({len(check.prompt_ids)} tokens), greedy, "
        f"up to {args.max_new_tokens} new tokens"
    )
    rows = run_checks(check, sail, groups, args)
    print_speed(rows, Path(model.path).name)
    if check.failures:
        print(f"chip check FAILED ({len(check.failures)}):")
        for failure in check.failures:
            print(f"  {failure}")
        return 1
    print("chip check passed")
    return 0


def run_checks(
    check: Check, sail: Any, groups: list[DeviceGroup], args: argparse.Namespace
) -> list[SpeedRow]:
    with check.step("sophon-sail"):
        version, available = sail_version(sail), sail.get_available_tpu_num()
        missing = sorted({device for group in groups for device in group if device >= available})
        if missing:  # before any Handle: sail.Handle ends the process on a device that is not there
            raise CheckFailed(f"devices {missing} do not exist: sophon-sail sees {available} TPUs")
        views = has_view_overload(sail, sail.Handle(groups[0][0]))
        print(f"  version {version}; view constructor Tensor(src, shape, offset): {'yes' if views else 'no'}")
        if not views:
            raise CheckFailed(
                f"sophon-sail {version} lacks the view constructor: install >= {MIN_SAIL_VERSION}"
            )
    if check.failures:
        return []
    loaded = load_graphs(check, sail, groups[0])
    if loaded is None:
        return []
    held, load_s = [loaded[0]], loaded[1]
    del loaded
    name = format_group(groups[0])
    rows = []
    with check.step(f"greedy answer on device {name}"):
        fresh = check.answer(held[0])
        rows.append(SpeedRow(name, load_s, fresh))
        finish = fresh.finish.value if fresh.finish else "-"
        print(f"  {len(fresh.tokens)} tokens ({finish}): {check.tokenizer.decode(fresh.tokens)!r}")
        compare_reference(check, fresh, args)
    with check.step("a failure mid-generation, the reset, the KV read back, the next answer"):
        recover(check, held[0], fresh)
    return rows + other_groups(check, held, name, fresh, groups[1:])


def load_graphs(check: Check, sail: Any, group: DeviceGroup) -> tuple[SailGraphs, float] | None:
    with check.step(f"the bmodel's graphs on device {format_group(group)}"):
        started = time.perf_counter()
        try:
            graphs = SailGraphs(check.model.path, group)
        except Exception:
            print_graphs_of_raw_engine(sail, check.model.path, group)
            raise
        load_s = time.perf_counter() - started
        for line in graph_table(graphs.engine):
            print(f"  {line}")
        layout = graphs.layout
        head = "token id" if layout.head_is_token else "logits"
        head += ", greedy_head" if layout.has_greedy_head else ""
        print(
            f"  checked: {layout.num_layers} layers, prefill {layout.prefill_length}, "
            f"KV {list(layout.kv_shape)}, hidden {layout.hidden_size}, {layout.devices} device(s), "
            f"head {head}"
        )
        return graphs, load_s
    return None


def print_graphs_of_raw_engine(sail: Any, path: str, group: DeviceGroup) -> None:
    """The graphs of a bmodel the adapter refused, so the operator sees what does not fit."""
    try:
        engine = sail.EngineLLM(path, list(group))
    except Exception:
        return
    for line in graph_table(engine):
        print(f"  {line}")


def compare_reference(check: Check, answer: Answer, args: argparse.Namespace) -> None:
    if args.record:
        record = {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "tokens": answer.tokens}
        args.record.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"  recorded {len(answer.tokens)} tokens to {args.record}")
    if args.expect:
        expected = read_reference(args.expect)
        # A reference may run on past our max_new_tokens (qwen.py stops at EOS only): compare what we made.
        compared = expected[: len(answer.tokens)] if answer.finish is FinishReason.LENGTH else expected
        if answer.tokens != compared:
            at = next(
                (i for i, (a, b) in enumerate(zip(answer.tokens, compared, strict=False)) if a != b),
                min(len(answer.tokens), len(compared)),
            )
            got, wanted = answer.tokens[at : at + 5], compared[at : at + 5]
            raise CheckFailed(
                f"the greedy tokens differ from {args.expect} at token {at}: "
                f"got {got}..., expected {wanted}..."
            )
        print(f"  equal to the {len(compared)} reference tokens of {args.expect}")


def read_reference(path: Path) -> list[int]:
    """A JSON list of token ids, or an object with "tokens" (what --record writes)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckFailed(f"cannot read the reference {path}: {error}") from None
    tokens = data.get("tokens") if isinstance(data, dict) else data
    if not isinstance(tokens, list) or not all(isinstance(token, int) for token in tokens):
        raise CheckFailed(f'{path}: expected a JSON list of token ids or {{"tokens": [...]}}')
    return tokens


class _FailingGraphs:
    """The graphs with one decode step made to fail, as a device fault would."""

    def __init__(self, graphs: SailGraphs, fail_at_step: int) -> None:
        self._graphs, self._fail_at_step, self._steps = graphs, fail_at_step, 0
        self.spec = graphs.spec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._graphs, name)

    def block_cache(self, layer: int, hidden: Any, position: int, mask: np.ndarray) -> Any:
        if layer == 0:
            self._steps += 1
            if self._steps == self._fail_at_step:
                raise EngineError(f"chip_check: failure forced at decode step {self._fail_at_step}")
        return self._graphs.block_cache(layer, hidden, position, mask)


def recover(check: Check, graphs: SailGraphs, fresh: Answer) -> None:
    failing = _FailingGraphs(graphs, FAULT_AT_DECODE_STEP)
    engine = LLMEngine(failing, check.tokenizer, "chip_check", check.model.defaults)
    engine_log = logging.getLogger("worker.core.llm_engine")
    level = engine_log.level
    engine_log.setLevel(logging.CRITICAL)  # the forced failure's traceback is noise here
    try:
        list(engine.generate(check.request, threading.Event()))
    except EngineError as error:
        print(f"  the forced failure ended the answer: {error}")
    else:
        raise CheckFailed("the forced failure did not happen (the answer ended before the decode step)")
    finally:
        engine_log.setLevel(level)
    nonzero = [
        layer for layer in range(graphs.spec.num_layers) if any(a.any() for a in graphs.read_kv(layer))
    ]
    if nonzero:
        raise CheckFailed(f"after the reset the KV cache of layers {nonzero[:8]} is not zero on the device")
    print(f"  KV cache of {graphs.spec.num_layers} layers read back: all zero")
    again = check.answer(graphs)
    if again.tokens != fresh.tokens:
        raise CheckFailed(
            f"the answer after the reset differs from the fresh one ({len(again.tokens)} tokens)"
        )
    print("  the next answer equals the fresh one")


def other_groups(
    check: Check, held: list[SailGraphs], first: str, fresh: Answer, groups: list[DeviceGroup]
) -> list[SpeedRow]:
    """The second group loaded while the first is still held (two in one process), then both
    released; every further group alone. Each must answer the first group's tokens."""
    rows = []
    if not groups:
        with check.step("two device groups in one process"):
            print("  skipped: one device group configured (give --dev-id twice to check it)")
    for index, group in enumerate(groups):
        name = format_group(group)
        with check.step(f"device {name} loaded beside device {first}" if index == 0 else f"device {name}"):
            try:
                started = time.perf_counter()
                held.append(SailGraphs(check.model.path, group))
                load_s = time.perf_counter() - started
                answer = check.answer(held[-1])
                rows.append(SpeedRow(name, load_s, answer))
                if answer.tokens != fresh.tokens:
                    raise CheckFailed(f"device {name} answered other tokens than device {first}")
            finally:
                released = len(held)
                held.clear()  # the only references: the engines and their device memory go now
                gc.collect()
                print(f"  released {released} loaded device group(s)")
    return rows


def print_speed(rows: list[SpeedRow], bmodel_name: str) -> None:
    if not rows:
        return
    print(_row("device", "load s", "first token s", "decode tokens/s", "tokens", "finish"))
    for row in rows:
        answer = row.answer
        rate = "-" if answer.decode_tokens_per_s is None else f"{answer.decode_tokens_per_s:.2f}"
        finish = answer.finish.value if answer.finish else ""
        print(
            _row(
                row.group,
                f"{row.load_s:.2f}",
                f"{answer.first_token_s:.3f}",
                rate,
                str(len(answer.tokens)),
                finish,
            )
        )
    published = PUBLISHED.get(bmodel_name)
    if published is None:
        print(f"sophon-demo publishes no figures for {bmodel_name} (it does for {', '.join(PUBLISHED)})")
        return
    (first_low, first_high), (rate_low, rate_high) = published.first_token_s, published.tokens_per_s
    print(_row("sophon-demo", "", f"{first_low}–{first_high}", f"{rate_low}–{rate_high}", "", ""))
    print(
        f"(sophon-demo: {bmodel_name}, seq_len {published.seq_len}, qwen.py on an SE7-32 BM1684X, "
        f"input {SOPHON_DEMO_PROMPT!r})"
    )


_WIDTHS = (12, 7, 13, 15, 6)


def _row(*cells: str) -> str:
    """Right-aligned columns, the last cell (finish reason) left as it is."""
    *aligned, last = cells
    return "  ".join(
        [*(f"{cell:>{width}}" for cell, width in zip(aligned, _WIDTHS, strict=True)), last]
    ).rstrip()


if __name__ == "__main__":
    sys.exit(main())
