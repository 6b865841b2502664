"""The CPU engine figures: runs scripts/bench_engine.py and reads the table it prints.

The script compares the numpy backend with Hugging Face transformers (when installed) on one model;
its table has one row per backend: load s, prefill tok/s, decode tok/s, peak RSS MB.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from bench.pool import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "bench_engine.py"
COLUMNS = ("load_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb")
TIMEOUT_S = 1800.0


def run_engine_benchmark(arguments: Sequence[str] = ()) -> dict:
    """Run the script; returns its command, its whole output and the figures of each backend."""
    command = [sys.executable, str(SCRIPT), *arguments]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{SCRIPT.name} exited with code {completed.returncode}:\n{completed.stderr.strip()[-2000:]}"
        )
    return {
        "command": " ".join(["python", "scripts/bench_engine.py", *arguments]),
        "output": completed.stdout,
        "backends": parse_table(completed.stdout),
    }


def parse_table(output: str) -> dict[str, dict[str, float]]:
    """{backend: {column: value}} from the rows under the script's `backend ...` header line."""
    lines = output.splitlines()
    header = next((index for index, line in enumerate(lines) if line.split()[:1] == ["backend"]), None)
    if header is None:
        raise ValueError("no `backend` table in the engine benchmark's output")
    backends = {}
    for line in lines[header + 1 :]:
        fields = line.split()
        if len(fields) != 1 + len(COLUMNS):
            break
        backends[fields[0]] = dict(zip(COLUMNS, map(float, fields[1:]), strict=True))
    if not backends:
        raise ValueError("the engine benchmark's table has no rows")
    return backends
