"""scripts/chip_check.py, the first-boot self-check, run as operators run it, on the sail stand-in
as a PCIe card and as an SoC box: every step, the reference tokens, and each way it must fail."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.sail_standin import FAKE_SAIL

REPO = Path(__file__).resolve().parents[1]
BMODEL_NAME = "qwen-7b_int4_seq512_1dev.bmodel"  # the published figures' model, as a stand-in of the tiny one


def run_chip_check(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "chip_check.py"), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def standin_env(*, soc: bool = False, version: str = "3.10.7", tpus: int = 2) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(FAKE_SAIL),
        "SAIL_STANDIN_TPU_NUM": str(tpus),
        "SAIL_STANDIN_SOC": "1" if soc else "0",
        "SAIL_STANDIN_VERSION": version,
    }


@pytest.fixture
def chip_config(tiny_chat_model: Path, tmp_path: Path) -> Callable[..., Path]:
    """A pool config serving a stand-in bmodel of the tiny chat model, compiled with `options`."""
    sys.path.insert(0, str(FAKE_SAIL))
    try:
        from sophon._bmodel import write_bmodel
    finally:
        sys.path.remove(str(FAKE_SAIL))

    def write(devices: str = "[0, 1]", **options: object) -> Path:
        bmodel = write_bmodel(tmp_path / BMODEL_NAME, tiny_chat_model, seq_len=128, **options)
        config = tmp_path / "chip.yaml"
        config.write_text(
            f"model:\n  name: tiny\n  engine: sail\n  path: {bmodel}\n  tokenizer: {tiny_chat_model}\n"
            f"workers:\n  devices: {devices}\n"
        )
        return config

    return write


def test_chip_check_without_sophon_sail_exits_2():
    if importlib.util.find_spec("sophon") is not None:
        pytest.skip("sophon-sail is installed here")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = run_chip_check("--config", str(REPO / "configs" / "bm1684x.yaml"), env=env)
    assert result.returncode == 2, result.stderr
    assert "sophon-sail is not installed" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("soc", [False, True], ids=["pcie", "soc"])
def test_chip_check_passes_every_step_and_compares_with_a_recorded_reference(chip_config, tmp_path, soc):
    config = chip_config(lm_head="token_id", addr_mode=1)
    reference = tmp_path / "tokens.json"
    env = standin_env(soc=soc)
    recorded = run_chip_check(
        "--config", str(config), "--max-new-tokens", "8", "--record", str(reference), env=env
    )
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    assert len(json.loads(reference.read_text())["tokens"]) == 8

    result = run_chip_check(
        "--config", str(config), "--max-new-tokens", "8", "--expect", str(reference), env=env
    )

    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "version 3.10.7; view constructor Tensor(src, shape, offset): yes" in out
    assert re.search(
        r"^  block_cache_1: addr_mode 1, static; in: \[1, 1, 32\] FLOAT16, .*\[1, 128, 2, 8\]", out, re.M
    )
    assert "  embedding: addr_mode 0, static; in: [1, 128] INT32; out: [1, 128, 32] BFLOAT16" in out
    assert "checked: 2 layers, prefill 128, KV [1, 128, 2, 8], hidden 32, 1 device(s), head token id" in out
    assert "equal to the 8 reference tokens" in out
    assert "KV cache of 2 layers read back: all zero" in out and "the next answer equals the fresh one" in out
    assert "- device 1 loaded beside device 0\n  released 2 loaded device group(s)\n  ok" in out
    number = r"\d+\.\d+"
    for device in (0, 1):
        assert re.search(rf"^\s+{device}\s+{number}\s+{number}\s+{number}\s+8\s+length$", out, re.M), out
    assert re.search(r"^\s+sophon-demo\s+0\.68–0\.74\s+9\.4–9\.8", out, re.M)
    assert out.rstrip().endswith("chip check passed")


def test_chip_check_fails_on_other_reference_tokens(chip_config, tmp_path):
    config = chip_config()
    reference = tmp_path / "qwen_py_tokens.json"
    reference.write_text("[1, 2, 3, 4]")  # as tokens dumped from sophon-demo's qwen.py: a plain list
    result = run_chip_check(
        "--config", str(config), "--max-new-tokens", "4", "--expect", str(reference), env=standin_env()
    )
    assert result.returncode == 1
    assert re.search(
        r"FAILED: the greedy tokens differ from .*qwen_py_tokens\.json at token 0", result.stdout
    )
    assert "chip check FAILED (1):" in result.stdout


def test_chip_check_names_the_minimum_sail_version(chip_config):
    result = run_chip_check("--config", str(chip_config()), env=standin_env(version="3.9.0"))
    assert result.returncode == 1
    assert "view constructor Tensor(src, shape, offset): no" in result.stdout
    assert "FAILED: sophon-sail 3.9.0 lacks the view constructor: install >= 3.9.1" in result.stdout


def test_chip_check_refuses_a_device_the_box_lacks(chip_config):
    result = run_chip_check(
        "--config", str(chip_config()), "--dev-id", "0", "--dev-id", "5", env=standin_env()
    )
    assert result.returncode == 1
    assert "FAILED: devices [5] do not exist: sophon-sail sees 2 TPUs" in result.stdout


@pytest.mark.parametrize("soc", [False, True], ids=["pcie", "soc"])
def test_chip_check_drives_a_2dev_bmodel_on_a_device_group(chip_config, soc):
    config = chip_config(devices='["0,1", "2,3"]', num_device=2, addr_mode=1)
    result = run_chip_check(
        "--config", str(config), "--max-new-tokens", "6", env=standin_env(soc=soc, tpus=4)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked: 2 layers, prefill 128, KV [1, 128, 1, 8], hidden 32, 2 device(s)" in result.stdout
    assert "- device 2,3 loaded beside device 0,1" in result.stdout
    assert re.search(r"^\s+2,3\s+\d", result.stdout, re.M)


def test_chip_check_shows_the_graphs_of_a_bmodel_it_refuses(chip_config):
    config = chip_config(max_input_length=256)  # prefill graphs longer than the KV cache
    result = run_chip_check("--config", str(config), env=standin_env())
    assert result.returncode == 1
    assert "  block_0: addr_mode 0, static; in: [1, 256, 32] FLOAT16" in result.stdout
    assert "the prefill graphs take 256 positions, more than the KV cache's 128" in result.stdout


def test_chip_check_fails_a_bmodel_for_another_device_count(chip_config):
    result = run_chip_check("--config", str(chip_config(devices="[0]", num_device=2)), env=standin_env())
    assert result.returncode == 1
    assert "FAILED: SailLoadError: sophon-sail could not load" in result.stdout
    assert "A bmodel for N devices needs a group of N chips" in result.stdout
