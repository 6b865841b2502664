"""Try a model from the command line: one chat turn, the answer streamed to stdout as it is generated.

    python -m worker.generate --model builtin:smollm2 --prompt "What is the capital of France?"
    python -m worker.generate --model ../qwen2.5-0.5b-instruct --prompt "你好" --temperature 0
    python -m worker.generate --engine sail --model qwen.bmodel --tokenizer token_config --prompt "你好"

Counts and the finish reason go to stderr, so stdout holds only the answer.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from common.config import ModelConfig
from worker.affinity import limit_blas_threads
from worker.core.engine import load_engine
from worker.core.request import USER, ChatRequest, RequestError, SamplingParams, Turn


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker.generate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="builtin:smollm2", help="HF folder, .gguf, builtin:smollm2 or .bmodel"
    )
    parser.add_argument("--engine", default="numpy", choices=("numpy", "sail"))
    parser.add_argument("--tokenizer", help="token_config folder (default: the model's own tokenizer)")
    parser.add_argument("--device-id", type=int, default=0, help="DEV_ID of the chip (sail)")
    parser.add_argument("--context-size", type=int, default=2048, help="KV-cache capacity (numpy)")
    parser.add_argument("--threads", type=int, help="BLAS threads (numpy; default: the BLAS library's)")
    parser.add_argument("--prompt", default="你好")
    parser.add_argument("--system", default="", help="system message (default: the template's own)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 = greedy (default: the configured 0.7)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        limit_blas_threads(args.threads)  # numpy is first imported by load_engine, below
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    request = ChatRequest(args.system, (Turn(USER, args.prompt),), params)
    try:
        config = ModelConfig(
            name="cli",
            engine=args.engine,
            path=args.model,
            tokenizer=args.tokenizer,
            context_size=args.context_size,
        )
        engine = load_engine(config, args.device_id)
        started = time.perf_counter()
        first_text_at = None
        for chunk in engine.generate(request, threading.Event()):
            if first_text_at is None and chunk.text:
                first_text_at = time.perf_counter()
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    except (RequestError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    elapsed = time.perf_counter() - started
    first = f"{first_text_at - started:.2f}" if first_text_at else "-"
    counts = f"{chunk.prompt_tokens} prompt + {chunk.completion_tokens} completion tokens"
    print(
        f"\n[{chunk.finish_reason.value}] {counts} in {elapsed:.2f} s (first text after {first} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
