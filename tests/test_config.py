"""Loading and validating the pool's YAML configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, PoolConfig, RouterConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pool.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ or {})
    return str(caught.value)


@pytest.mark.parametrize("name", ["default.yaml", "bm1684x.yaml", "paced.yaml"])
def test_shipped_configs_load(name):
    assert isinstance(load_config(REPO / "configs" / name, {}), PoolConfig)


def test_default_config_is_the_cpu_default():
    config = load_config(REPO / "configs" / "default.yaml", {})
    assert config.model.engine == "numpy"
    assert config.model.path == "builtin:smollm2"
    assert config.workers.devices == (0, 1)
    assert config.workers.per_device == 1
    assert config.model.threads == 1
    assert config.router.listen == "127.0.0.1:18000"
    assert config.router.zmq_bind.startswith("tcp://127.0.0.1:")


def test_bm1684x_config_serves_the_seed_model_greedily():
    config = load_config(REPO / "configs" / "bm1684x.yaml", {})
    assert config.model.engine == "sail"
    assert config.model.path == "./models/BM1684X/qwen-7b_int4_1dev.bmodel"
    assert config.model.tokenizer == "./token_config"
    assert config.workers.devices == (0, 1, 2, 3)
    assert config.model.defaults.temperature == 0.0


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), {}) == PoolConfig()


def test_values_are_read_into_the_dataclasses(tmp_path):
    config = load_config(
        write(
            tmp_path,
            """
router: {listen: "0.0.0.0:19000", queue_size: 8, heartbeat_interval_s: 2}
model:
  engine: paced
  tokenizer: ./tok
  defaults: {temperature: 0, seed: 7}
  paced: {tokens_per_second: 25}
workers: {devices: [2, 3], per_device: 2}
""",
        ),
        {},
    )
    assert config.router.listen == "0.0.0.0:19000"
    assert config.router.queue_size == 8
    assert config.router.heartbeat_interval_s == 2.0
    assert isinstance(config.router.heartbeat_interval_s, float)
    assert config.model.engine == "paced"
    assert config.model.tokenizer == "./tok"
    assert config.model.defaults.temperature == 0.0
    assert config.model.defaults.seed == 7
    assert config.model.defaults.top_p == 0.9  # untouched default
    assert config.model.paced.tokens_per_second == 25.0
    assert config.workers.devices == (2, 3)
    assert config.workers.count == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {engine: gpu}", "model.engine: must be one of numpy, sail, paced, got 'gpu'"),
        ("router: {listenn: x}", "router.listenn: unknown key (expected one of: listen,"),
        (
            "modle: {}",
            "modle: unknown key (expected one of: router, model, workers, http, security, admin, models)",
        ),
        ("model: {defaults: {top_p: 1.5}}", "model.defaults.top_p: must be in (0, 1], got 1.5"),
        (
            "model: {defaults: {temperature: -1}}",
            "model.defaults.temperature: must be >= 0 (0 = greedy), got -1",
        ),
        (
            "model: {paced: {tokens_per_second: -1}}",
            "model.paced.tokens_per_second: must be >= 0 (0 = as fast as possible), got -1.0",
        ),
        ("model: {threads: true}", "model.threads: must be an integer, got True"),
        ("model: {threads: 1.5}", "model.threads: must be an integer, got 1.5"),
        ("model: {threads: 0}", "model.threads: must be >= 1, got 0"),
        ("model: {name: 3}", "model.name: must be a string, got 3"),
        ("model: {name: ''}", "model.name: must not be empty, got ''"),
        ("model: {context_size: '2048'}", "model.context_size: must be an integer, got '2048'"),
        ("router: {heartbeat_interval_s: fast}", "router.heartbeat_interval_s: must be a number, got 'fast'"),
        ("router: {listen: localhost}", "router.listen: must be host:port, got 'localhost'"),
        ("router: {listen: 'h:99999'}", "router.listen: must be host:port, got 'h:99999'"),
        ("router: {zmq_bind: 'udp://x:1'}", "router.zmq_bind: must be tcp://host:port or ipc://path"),
        ("router: {liveness: 1}", "router.liveness: must be >= 2, got 1"),
        ("router: {max_request_bytes: 99999999}", "router.max_request_bytes: must be in [1, "),
        ("router: {metrics_listen: 9400}", "router.metrics_listen: must be a string, got 9400"),
        ("router: {event_loop: trio}", "router.event_loop: must be one of uvloop, asyncio, got 'trio'"),
        ("workers: {devices: []}", "workers.devices: must list at least one device id, got []"),
        ("workers: {devices: 0}", "workers.devices: must be a list of int or str, got 0"),
        (
            "workers: {devices: [0, x]}",
            "workers.devices: a device group is a device id or comma-separated ids such as 0,1, got 'x' "
            "(in [0, 'x'])",
        ),
        ("workers: {devices: [1, 1]}", "workers.devices: must not repeat an id, got [1, 1]"),
        ("workers: {devices: [-1]}", "workers.devices: must be ids >= 0, got [-1]"),
        ("workers: {per_device: 0}", "workers.per_device: must be >= 1, got 0"),
        (
            "workers: {restart_backoff_s: 5, restart_backoff_max_s: 1}",
            "workers.restart_backoff_max_s: must be >= restart_backoff_s, got 1.0",
        ),
        (
            "workers: {allow_cpu_oversubscription: 1}",
            "workers.allow_cpu_oversubscription: must be true or false",
        ),
        ("router: [1, 2]", "router: must be a mapping, got [1, 2]"),
        ("model:\n  defaults: 3", "model.defaults: must be a mapping, got 3"),
        ("- a\n- b", "must hold a mapping of sections, got list"),
        ("router: {listen: [unclosed", "is not valid YAML"),
    ],
)
def test_bad_values_fail_naming_the_key(tmp_path, text, message):
    assert message in error_of(tmp_path, text)


def test_missing_file_fails_with_its_name(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*nowhere\.yaml"):
        load_config(tmp_path / "nowhere.yaml", {})


def test_environment_overrides_like_the_seed(tmp_path):
    path = write(tmp_path, "model: {path: a.gguf, tokenizer: tok}\nworkers: {devices: [0, 1]}\n")
    environ = {"MODEL_PATH": "/m/qwen.bmodel", "TOKENIZER_PATH": "/m/token_config", "DEV_ID": "2"}
    config = load_config(path, environ)
    assert config.model.path == "/m/qwen.bmodel"
    assert config.model.tokenizer == "/m/token_config"
    assert config.workers.devices == (2,)
    assert load_config(path, {"DEV_ID": " 0, 3 ,5"}).workers.devices == (0, 3, 5)
    assert load_config(path, {"DEV_ID": ""}).workers.devices == (0, 1)  # empty = not set


def test_environment_overrides_apply_without_the_sections(tmp_path):
    config = load_config(write(tmp_path, ""), {"MODEL_PATH": "x.gguf", "DEV_ID": "1"})
    assert config.model.path == "x.gguf"
    assert config.workers.devices == (1,)


def test_environment_overrides_default_to_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv("DEV_ID", "4")
    assert load_config(write(tmp_path, "")).workers.devices == (4,)


@pytest.mark.parametrize("value", ["gpu0", "1,,2", "-1", "1:2"])
def test_bad_dev_id_fails_naming_the_variable(tmp_path, value):
    assert error_of(tmp_path, "", {"DEV_ID": value}).startswith(
        "DEV_ID: must be a device id or a comma-separated"
    )


def test_repeated_dev_id_fails_naming_the_key(tmp_path):
    assert "workers.devices: must not repeat an id" in error_of(tmp_path, "", {"DEV_ID": "1,1"})


def test_dataclasses_validate_when_built_in_code():
    with pytest.raises(ConfigError, match=r"^liveness: must be >= 2, got 0$"):
        RouterConfig(liveness=0)


@pytest.mark.parametrize(
    ("bind", "endpoint"),
    [
        ("tcp://127.0.0.1:18100", "tcp://127.0.0.1:18100"),
        ("tcp://*:18100", "tcp://127.0.0.1:18100"),
        ("tcp://0.0.0.0:18100", "tcp://127.0.0.1:18100"),
        ("ipc:///tmp/pool.sock", "ipc:///tmp/pool.sock"),
    ],
)
def test_local_workers_connect_to_the_bind_address(bind, endpoint):
    assert RouterConfig(zmq_bind=bind).worker_endpoint() == endpoint


def test_loading_the_config_does_not_import_numpy():
    """The worker sets the BLAS thread variables after reading its config: numpy must not be loaded yet."""
    code = "import sys, common.config, worker.affinity; sys.exit('numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
