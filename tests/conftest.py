"""Shared test fixtures: the fixture data folder beside the repository, and tokenizers loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.core.builtin_model import builtin_model_path
from worker.core.tokenizer import Tokenizer, load_tokenizer

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """../shared/fixtures (real tiny model and tokenizers); tests using it skip when it is absent."""
    if not FIXTURES.is_dir():
        pytest.skip(f"fixture data not found at {FIXTURES} (a fresh clone has no ../shared/fixtures)")
    return FIXTURES


@pytest.fixture(scope="session")
def qwen25_tokenizer(fixtures_dir: Path) -> Tokenizer:
    """Qwen2.5 vocab.json + merges.txt with its tokenizer_config.json (real chat template)."""
    return load_tokenizer(fixtures_dir / "qwen2.5-tokenizer")


@pytest.fixture(scope="session")
def qwen7b_tokenizer(fixtures_dir: Path) -> Tokenizer:
    """Qwen-7B v1 qwen.tiktoken."""
    return load_tokenizer(fixtures_dir / "qwen-7b-token_config")


@pytest.fixture(scope="session")
def stories_tokenizer(fixtures_dir: Path) -> Tokenizer:
    """stories260K tokenizer.json: Llama-style SentencePiece BPE with byte fallback."""
    return load_tokenizer(fixtures_dir / "stories260K" / "hf")


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Tokenizer:
    """The tokenizer inside the embedded default model's GGUF (byte-level BPE)."""
    return load_tokenizer(builtin_model_path())


def pytest_configure(config: pytest.Config) -> None:
    # `make test` runs these too; `pytest -m "not slow"` leaves them out for a quick local loop.
    config.addinivalue_line("markers", "slow: loads a real model in several processes (seconds each)")
