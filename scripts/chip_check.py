"""Check a BM1684X box: load the configured bmodel on each DEV_ID, run one prompt, print the speed.

    python scripts/chip_check.py --config configs/bm1684x.yaml [--dev-id N ...]

For operators who have the chip. Each device loads the model exactly as a worker does
(worker.core.engine.load_engine), answers a fixed prompt greedily, and gets a row with its time to
first token and decode tokens/s, beside sophon-demo's published figures for the same bmodel.
The default prompt is the input of sophon-demo's own measurement, so the rows compare like for like.
Exit status: 0 all devices fine, 1 a device failed (or the config is unusable), 2 no sophon-sail.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import ConfigError, ModelConfig, load_config
from worker.core.engine import load_engine
from worker.core.request import USER, ChatRequest, SamplingParams, Turn
from worker.core.sail_graphs import SailNotInstalledError, import_sail

# sophon-demo sample/Qwen README, "程序性能测试" (input "请使用C++写一段冒泡排序算法。"), SE7-32 (BM1684X),
# the range over the README's revisions. The older download named the same seq512 model without "seq512".
SOPHON_DEMO_PROMPT = "请使用C++写一段冒泡排序算法。"
SYSTEM_MESSAGE = "You are a helpful assistant."


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


@dataclass(frozen=True)
class DeviceRun:
    device: int
    load_s: float = 0.0
    first_token_s: float = 0.0
    decode_tokens_per_s: float | None = None  # None: nothing decoded after the first chunk
    tokens: int = 0
    finish: str = ""
    error: str | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/chip_check.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", required=True, help="pool config with a sail model, e.g. configs/bm1684x.yaml"
    )
    parser.add_argument(
        "--dev-id", type=int, action="append", help="device to check (repeatable; default: workers.devices)"
    )
    parser.add_argument(
        "--prompt", default=SOPHON_DEMO_PROMPT, help="user turn (default: sophon-demo's input)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import_sail()
    except SailNotInstalledError as error:
        print(f"chip_check: {error}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"chip_check: {args.config}: {error}", file=sys.stderr)
        return 1
    model, devices = config.model, args.dev_id or list(config.workers.devices)
    if model.engine != "sail":
        print(
            f"chip_check: {args.config} has engine {model.engine!r}; this checks a sail bmodel",
            file=sys.stderr,
        )
        return 1
    print(
        f"chip check: {model.path}, prompt {args.prompt!r} (greedy, up to {args.max_new_tokens} new tokens)"
    )
    runs = [check_device(model, device, args.prompt, args.max_new_tokens) for device in devices]
    print_report(runs, Path(model.path).name)
    return 1 if any(run.error for run in runs) else 0


def check_device(model: ModelConfig, device: int, prompt: str, max_new_tokens: int) -> DeviceRun:
    started = time.perf_counter()
    try:
        engine = load_engine(model, device)
        loaded = time.perf_counter()
        request = ChatRequest(
            SYSTEM_MESSAGE,
            (Turn(USER, prompt),),
            SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
        )
        first = last = None
        first_tokens = 0
        for chunk in engine.generate(request, threading.Event()):
            last = chunk
            if first is None and chunk.completion_tokens:
                first, first_tokens = time.perf_counter(), chunk.completion_tokens
        finished = time.perf_counter()
    except Exception as error:  # a device's failure is its row; the other devices still run
        return DeviceRun(device, error=f"{type(error).__name__}: {error}")
    if first is None or last is None:
        return DeviceRun(device, error="the model generated no token")
    decoded = last.completion_tokens - first_tokens
    return DeviceRun(
        device,
        load_s=loaded - started,
        first_token_s=first - loaded,
        decode_tokens_per_s=decoded / (finished - first) if decoded else None,
        tokens=last.completion_tokens,
        finish=last.finish_reason.value if last.finish_reason else "",
    )


def print_report(runs: list[DeviceRun], bmodel_name: str) -> None:
    print(_row("device", "load s", "first token s", "decode tokens/s", "tokens", "finish"))
    for run in runs:
        if run.error:
            print(f"{run.device:>{_WIDTHS[0]}}  FAILED: {run.error}")
            continue
        rate = "-" if run.decode_tokens_per_s is None else f"{run.decode_tokens_per_s:.2f}"
        print(
            _row(
                str(run.device),
                f"{run.load_s:.2f}",
                f"{run.first_token_s:.3f}",
                rate,
                str(run.tokens),
                run.finish,
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
