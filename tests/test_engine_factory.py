"""load_engine: one entry point that builds the configured engine, with clear errors for bad settings."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common.config import ModelConfig
from tests.tiny_chat_model import MAX_POSITIONS
from worker.core.engine import load_engine
from worker.core.llm_engine import LLMEngine
from worker.core.paced import PacedEngine
from worker.core.request import USER, ChatRequest, SamplingParams, Turn

REPO = Path(__file__).resolve().parents[1]


def test_numpy_engine_from_a_hf_folder_is_capped_at_the_model_positions(tiny_chat_model):
    config = ModelConfig(name="tiny", path=str(tiny_chat_model), context_size=2 * MAX_POSITIONS)
    engine = load_engine(config, device_id=0)

    assert isinstance(engine, LLMEngine)
    assert engine.model_id == "tiny"
    assert engine.context_size == MAX_POSITIONS  # max_position_embeddings of the checkpoint
    request = ChatRequest("", (Turn(USER, "Hi"),), SamplingParams(max_new_tokens=3, temperature=0.0))
    assert list(engine.generate(request, threading.Event()))[-1].completion_tokens == 3


def test_paced_engine():
    assert isinstance(load_engine(ModelConfig(engine="paced"), device_id=0), PacedEngine)


def test_sail_needs_a_tokenizer_folder():
    with pytest.raises(ValueError, match=r"needs model\.tokenizer"):
        load_engine(ModelConfig(engine="sail", path="qwen.bmodel"), device_id=0)


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("/nonexistent/model", FileNotFoundError, "does not exist"),
        ("builtin:nope", ValueError, "unknown builtin model 'nope'"),
    ],
)
def test_bad_model_paths_are_named(path, error, message):
    with pytest.raises(error, match=message):
        load_engine(ModelConfig(path=path), device_id=0)


def test_a_file_that_is_no_model_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"neither a Hugging Face folder nor a \.gguf file"):
        load_engine(ModelConfig(path=str(tmp_path / "weights.bin")), device_id=0)


def test_the_numpy_engine_never_imports_sophon(tiny_chat_model):
    """In a fresh interpreter: this test process may hold the tests' sophon.sail stand-in."""
    script = (
        "import sys\n"
        "from common.config import ModelConfig\n"
        "from worker.core.engine import load_engine\n"
        f"load_engine(ModelConfig(path={str(tiny_chat_model)!r}), device_id=0)\n"
        "assert not any(name.startswith('sophon') for name in sys.modules), 'sophon imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=120)
