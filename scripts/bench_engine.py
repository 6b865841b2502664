"""Engine benchmark: prefill and decode tokens/s and peak memory of the numpy backend on one model,
beside Hugging Face transformers on the same weights when `transformers` and `torch` are installed.

    python scripts/bench_engine.py                      # the default model, builtin:smollm2
    python scripts/bench_engine.py --model ../shared/fixtures/stories260K/hf --threads 2
    python scripts/bench_engine.py --json engine.json   # the figures as JSON too (`-`: on stdout only)

Each backend runs in a fresh process, so its peak RSS is its own. Decoding is greedy and ignores
end-of-sequence, so every run decodes exactly --new-tokens tokens.

The JSON document: {"model", "prompt_tokens", "new_tokens", "threads", "backends": {name: {"load_s",
"prompt_tokens", "prefill_tokens_per_s", "new_tokens", "decode_tokens_per_s", "peak_rss_mb"}}}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

if __package__ in (None, ""):  # run as a file (also in the spawned processes): find the packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.affinity import limit_blas_threads

PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "books were made, how ideas travelled between cities and how people learned to read and write. "
)


@dataclass(frozen=True)
class Figures:
    backend: str
    load_s: float
    prompt_tokens: int
    prefill_tokens_per_s: float
    new_tokens: int
    decode_tokens_per_s: float
    peak_rss_mb: float


Bench = Callable[[argparse.Namespace], Figures]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2", help="HF folder, .gguf or builtin:NAME")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="BLAS / torch threads")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON (`-`: on stdout only)")
    args = parser.parse_args()
    limit_blas_threads(args.threads)  # the benchmark processes inherit the environment
    text = sys.stderr if args.json == "-" else sys.stdout  # stdout carries the JSON alone then
    workload = f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens"
    print(f"model {args.model}: {workload}, {args.threads} thread(s)", file=text)
    results = [in_child(bench_numpy, args)]
    if transformers_available():
        results.append(in_child(bench_transformers, args))
    else:
        print("transformers + torch not importable: skipped the Hugging Face comparison", file=text)
    print_table(results, text)
    if args.json:
        write_json(args, results)
    return 0


def in_child(bench: Bench, args: argparse.Namespace) -> Figures:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run, args=(bench, args, queue))
    process.start()
    figures = queue.get()
    process.join()
    if isinstance(figures, BaseException):
        raise figures
    return figures


def _run(bench: Bench, args: argparse.Namespace, queue: multiprocessing.Queue) -> None:
    try:
        queue.put(bench(args))
    except Exception as error:
        queue.put(RuntimeError(f"{bench.__name__} failed: {type(error).__name__}: {error}"))


def prompt_ids(encode: Callable[[str], list[int]], count: int) -> list[int]:
    ids = encode(PROMPT_TEXT)
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def bench_numpy(args: argparse.Namespace) -> Figures:
    import threading

    import numpy as np

    from worker.core.driver import Generation
    from worker.core.model_files import load_numpy_model
    from worker.core.numpy_graphs import NumpyGraphs

    started = time.perf_counter()
    weights, tokenizer = load_numpy_model(args.model)
    load_s = time.perf_counter() - started
    ids = prompt_ids(tokenizer.encode, args.prompt_tokens)
    graphs = NumpyGraphs(weights, seq_len=args.prompt_tokens + args.new_tokens)
    generation = Generation(
        graphs, ids, lambda logits, _: int(np.argmax(logits)), args.new_tokens, (), threading.Event()
    )
    tokens = iter(generation)
    started = time.perf_counter()
    next(tokens)
    prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    decoded = sum(1 for _ in tokens)
    decode_s = time.perf_counter() - started
    return Figures(
        "numpy", load_s, len(ids), len(ids) / prefill_s, decoded, decoded / decode_s, peak_rss_mb()
    )


def bench_transformers(args: argparse.Namespace) -> Figures:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.core.model_files import resolve_model_path

    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    folder, extra = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    load_s = time.perf_counter() - started
    ids = torch.tensor(
        [prompt_ids(lambda text: tokenizer.encode(text, add_special_tokens=False), args.prompt_tokens)]
    )
    with torch.inference_mode():
        started = time.perf_counter()
        output = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - started
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        past = output.past_key_values
        started = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            output = model(token, past_key_values=past, use_cache=True)
            token, past = output.logits[:, -1].argmax(-1, keepdim=True), output.past_key_values
        decode_s = time.perf_counter() - started
    decoded = args.new_tokens - 1
    return Figures(
        "transformers",
        load_s,
        ids.shape[1],
        ids.shape[1] / prefill_s,
        decoded,
        decoded / decode_s,
        peak_rss_mb(),
    )


def transformers_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def print_table(results: list[Figures], out: TextIO) -> None:
    header = f"{'backend':<14}{'load s':>8}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak RSS MB':>13}"
    print(header, file=out)
    for figures in results:
        print(
            f"{figures.backend:<14}{figures.load_s:>8.1f}{figures.prefill_tokens_per_s:>15.1f}"
            f"{figures.decode_tokens_per_s:>14.1f}{figures.peak_rss_mb:>13.0f}",
            file=out,
        )


def write_json(args: argparse.Namespace, results: list[Figures]) -> None:
    backends = {}
    for figures in results:
        backends[figures.backend] = {key: value for key, value in asdict(figures).items() if key != "backend"}
    document = {
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "backends": backends,
    }
    text = json.dumps(document, indent=2) + "\n"
    if args.json == "-":
        sys.stdout.write(text)
    else:
        Path(args.json).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
