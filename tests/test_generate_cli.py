"""`python -m worker.generate` streams an answer to stdout and its counts to stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def generate(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "worker.generate", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_streams_a_greedy_answer(tiny_chat_model):
    model = str(tiny_chat_model)
    run = generate(
        "--model", model, "--prompt", "Tell me a story.", "--temperature", "0", "--max-new-tokens", "12"
    )

    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    assert "[length]" in run.stderr and "+ 12 completion tokens" in run.stderr
    again = generate(
        "--model", model, "--prompt", "Tell me a story.", "--temperature", "0", "--max-new-tokens", "12"
    )
    assert again.stdout == run.stdout


def test_a_bad_model_path_is_a_clear_error():
    run = generate("--model", "/nonexistent/model")
    assert run.returncode == 2
    assert "error: model path /nonexistent/model does not exist" in run.stderr
