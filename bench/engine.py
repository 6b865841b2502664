"""The CPU engine figures: runs scripts/bench_engine.py and reads the JSON document it writes.

The script compares the numpy backend with Hugging Face transformers (when installed) on one model
and prints a table (kept here as `output`, for display); with --json it writes the same figures as
JSON, which is what is read.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.pool import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "bench_engine.py"
FIGURES = ("load_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb")
TIMEOUT_S = 1800.0


def run_engine_benchmark(arguments: Sequence[str] = ()) -> dict:
    """Run the script; returns its command, its printed table and its JSON document's figures."""
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as scratch:
        report = Path(scratch) / "engine.json"
        command = [sys.executable, str(SCRIPT), *arguments, "--json", str(report)]
        completed = subprocess.run(
            command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"{SCRIPT.name} exited with code {completed.returncode}:\n{completed.stderr.strip()[-2000:]}"
            )
        document = read_report(report.read_text(encoding="utf-8"))
    return {
        "command": " ".join(["python", "scripts/bench_engine.py", *arguments]),
        "output": completed.stdout,
        **document,
    }


def read_report(text: str) -> dict:
    """The script's JSON document, checked: every backend has every figure, as a number."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"the engine benchmark's JSON is not valid: {error}") from error
    backends = document.get("backends") if isinstance(document, dict) else None
    if not isinstance(backends, dict) or not backends:
        raise ValueError("the engine benchmark's JSON has no `backends`")
    for name, figures in backends.items():
        missing = [key for key in FIGURES if not isinstance(figures.get(key), int | float)]
        if missing:
            raise ValueError(f"the engine benchmark's JSON lacks {', '.join(missing)} for backend {name!r}")
    return document
