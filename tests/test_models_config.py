"""Several models in one pool: the `models:` config list and which model a request goes to."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, PoolConfig, load_config, restart_only_changes
from router.models import ConflictingModel, ServedModels, UnknownModel


def load(tmp_path: Path, text: str) -> PoolConfig:
    path = tmp_path / "pool.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, {})


def test_a_models_list_places_each_model_on_its_devices(tmp_path):
    config = load(
        tmp_path,
        """
workers: {devices: [0, 1], per_device: 2}
models:
  - {name: qwen, engine: paced}
  - {name: llama, engine: paced, devices: [2, 3], per_device: 1, defaults: {temperature: 0}}
""",
    )
    assert config.model.name == "qwen"  # the first is the default
    assert [model.name for model in config.served_models] == ["qwen", "llama"]
    assert [(p.device_id, p.model.name, p.workers) for p in config.placements()] == [
        ("0", "qwen", 2),
        ("1", "qwen", 2),
        ("2", "llama", 1),
        ("3", "llama", 1),
    ]
    assert config.model_named("llama").defaults.temperature == 0.0
    assert config.model_named("gpt") is None


def test_the_single_model_form_still_works(tmp_path):
    config = load(tmp_path, "model: {name: one, engine: paced}\nworkers: {devices: [4]}\n")
    assert [(p.device_id, p.model.name, p.workers) for p in config.placements()] == [("4", "one", 1)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {name: a}\nmodels: [{name: b}]\n", "models: give either `model:` (one model) or `models:`"),
        ("models: []\n", "models: must list at least one model"),
        ("models: [{name: a}, {name: a, devices: [5]}]\n", "models: must not repeat a name"),
        (
            "models: [{name: a, devices: [0]}, {name: b, devices: [0, 1]}]\n",
            "models: device 0 is given to both 'a' and 'b'",
        ),
        ("models: [{name: a, per_device: -1}]\n", "models[0].per_device: must be >= 0, got -1"),
        ("admin: {listen: nowhere}\n", "admin.listen: must be host:port, got 'nowhere'"),
    ],
)
def test_bad_model_lists_fail_naming_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert message in str(caught.value)


def test_the_admin_api_listens_on_loopback_by_default():
    assert PoolConfig().admin.listen == "127.0.0.1:18001"


def test_restart_only_changes_name_the_settings_and_both_values(tmp_path):
    old = load(tmp_path, "router: {listen: '127.0.0.1:1000'}\n")
    new = load(tmp_path, "router: {listen: '127.0.0.1:2000'}\nworkers: {per_device: 3}\n")
    assert restart_only_changes(old, new) == [
        "router.listen: '127.0.0.1:1000' -> '127.0.0.1:2000' (needs a restart)"
    ]


def test_a_request_goes_to_its_model_or_the_default():
    served = ServedModels(["qwen", "llama"], lambda: ["qwen", "remote-model"], listed=True)
    assert served.resolve(None, ()) == "qwen"
    assert served.resolve("llama", ()) == "llama"
    assert served.resolve(None, (("x-model", "llama"),)) == "llama"
    assert served.resolve("remote-model", ()) == "remote-model"  # a registered worker serves it
    with pytest.raises(UnknownModel) as unknown:
        served.resolve("gpt", ())
    assert str(unknown.value) == "model 'gpt' is not served here; served models: qwen, llama, remote-model"
    with pytest.raises(ConflictingModel):
        served.resolve("qwen", (("x-model", "llama"),))


def test_with_a_single_model_a_request_naming_none_goes_to_any_worker():
    served = ServedModels(["qwen"], lambda: ["qwen-on-another-host"], listed=False)
    assert served.resolve(None, ()) is None
    assert served.default_name == "qwen"
    assert served.resolve("qwen", ()) == "qwen"
