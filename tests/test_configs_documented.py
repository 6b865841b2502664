"""configs/default.yaml says it lists every key the pool knows with its default: hold it to that for
every section (the fronts' http, admin and security sections included), and every shipped config
loads."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from common.config import PoolConfig, load_config

REPO = Path(__file__).resolve().parents[1]
# Keys that only make sense elsewhere: `models:` replaces `model:` (described in a comment), and a
# model's devices / per_device belong to a `models:` entry.
NOT_IN_DEFAULT = {"models", "model.devices", "model.per_device"}


def known_keys(cls: type, prefix: str = "") -> set[str]:
    """Every key of the config schema, dotted (`security.tls.cert_file`), sections included."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        keys.add(key)
        if dataclasses.is_dataclass(hints[field.name]):
            keys |= known_keys(hints[field.name], f"{key}.")
    return keys


def written_keys(raw: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for name, value in raw.items():
        keys.add(f"{prefix}{name}")
        if isinstance(value, dict):
            keys |= written_keys(value, f"{prefix}{name}.")
    return keys


def test_the_default_config_lists_every_key_of_every_section():
    raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text(encoding="utf-8"))
    missing = known_keys(PoolConfig) - NOT_IN_DEFAULT - written_keys(raw)
    assert not missing, f"configs/default.yaml does not list {sorted(missing)}"


def test_the_default_config_keeps_the_safe_defaults_of_the_fronts():
    config = load_config(REPO / "configs" / "default.yaml", {})
    defaults = PoolConfig()
    assert (config.http, config.admin, config.security) == (defaults.http, defaults.admin, defaults.security)
    listeners = [config.router.listen, config.http.listen, config.admin.listen]
    assert all(address.startswith("127.0.0.1:") for address in listeners)
    assert len({address.rpartition(":")[2] for address in listeners}) == 3  # one port each


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert isinstance(load_config(path, {}), PoolConfig), path
