"""Loading the sail stand-in (tests/fake_sail/) as `sophon.sail`, for one test at a time.

The stand-in behaves as a box chosen through environment variables (tests/fake_sail/sophon/sail.py):
SoC or PCIe, the number of chips, the sail release. Each load drops any `sophon` module imported
before, so a test gets a stand-in configured as it asked.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

FAKE_SAIL = Path(__file__).resolve().parent / "fake_sail"


def drop_sophon_modules() -> None:
    for name in [name for name in sys.modules if name == "sophon" or name.startswith("sophon.")]:
        del sys.modules[name]


def load_standin(
    monkeypatch: pytest.MonkeyPatch, *, soc: bool = False, version: str | None = None, tpus: int = 1
) -> object:
    """Import the stand-in as `sophon.sail` behaving as a given box (restored by `monkeypatch`)."""
    monkeypatch.syspath_prepend(str(FAKE_SAIL))
    drop_sophon_modules()
    monkeypatch.setenv("SAIL_STANDIN_SOC", "1" if soc else "0")
    monkeypatch.setenv("SAIL_STANDIN_TPU_NUM", str(tpus))
    if version is None:
        monkeypatch.delenv("SAIL_STANDIN_VERSION", raising=False)
    else:
        monkeypatch.setenv("SAIL_STANDIN_VERSION", version)
    return importlib.import_module("sophon.sail")
