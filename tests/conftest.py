"""Shared test fixtures: the fixture data folder beside the repository, the tiny models and tokenizers the
tests make themselves, and tokenizers loaded once."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import ProcessSet
from tests.sail_standin import drop_sophon_modules, load_standin
from tests.tiny_chat_model import write_tiny_chat_model
from tests.tiny_spm_tokenizer import write_tiny_spm_tokenizer
from worker.core.builtin_model import builtin_model_path
from worker.core.tokenizer import Tokenizer, load_tokenizer

# POOL_TEST_FIXTURES points the lookup elsewhere, e.g. at a missing folder to run the suite as a fresh
# clone would: `POOL_TEST_FIXTURES=/nonexistent pytest`.
FIXTURES = Path(
    os.environ.get("POOL_TEST_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
)


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


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen2 with a trained byte-level BPE and ChatML template (tests/tiny_chat_model.py)."""
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="session")
def tiny_chat_tokenizer(tiny_chat_model: Path) -> Tokenizer:
    return load_tokenizer(tiny_chat_model)


@pytest.fixture(scope="session")
def tiny_spm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """Llama-style SentencePiece BPE with byte fallback and BOS (tests/tiny_spm_tokenizer.py)."""
    return load_tokenizer(write_tiny_spm_tokenizer(tmp_path_factory.mktemp("tiny-spm-tokenizer")))


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessSet]:
    """Processes a test starts (router, workers, supervisor, clients), all stopped when it ends."""
    with ProcessSet(tmp_path) as procs:
        yield procs


def pytest_configure(config: pytest.Config) -> None:
    # `make test` runs these too; `pytest -m "not slow"` leaves them out for a quick local loop.
    config.addinivalue_line("markers", "slow: loads a real model in several processes (seconds each)")


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., object]]:
    """`standin(soc=..., version=..., tpus=...)` imports the sail stand-in as `sophon.sail` behaving
    as that box; the test may load it again as another box."""
    yield lambda **box: load_standin(monkeypatch, **box)
    drop_sophon_modules()


@pytest.fixture
def sail(standin: Callable[..., object]) -> object:
    """The sail stand-in as `sophon.sail` (a PCIe box, the default release), for this test only."""
    return standin()
