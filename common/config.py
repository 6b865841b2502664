"""Deployment configuration: the YAML schema as typed dataclasses, loaded and validated in one place.

Every knob of the pool lives here with its default; a bad file fails with a message naming the key.
Each dataclass checks its own ranges in __post_init__, so a config built in code is checked too;
`load_config` adds the structural checks (unknown keys, types) and the seed's environment overrides.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from common.devices import DeviceGroupError, format_group, group_of, overlapping, parse_group
from common.wire import MAX_FRAME_BYTES

ENGINES = ("numpy", "sail", "paced")
EVENT_LOOPS = ("uvloop", "asyncio")  # router.event_loop: router/event_loop.py runs them
# Room a Generate needs around the request text itself (ids, field tags, sampling params).
_FRAME_HEADROOM_BYTES = 64 << 10


class ConfigError(ValueError):
    """A configuration value that cannot be used; `key` is its dotted path (or an env variable)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem

    def under(self, section: str) -> ConfigError:
        """The same error seen from the enclosing section."""
        return ConfigError(f"{section}.{self.key}" if self.key else section, self.problem)


def _require(ok: bool, key: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(key, f"{rule}, got {value!r}")


def _require_host_port(key: str, value: str) -> None:
    host, _, port = value.rpartition(":")
    _require(bool(host) and port.isdigit() and 0 < int(port) < 65536, key, "must be host:port", value)


@dataclass(frozen=True)
class GenerationDefaults:
    """Used for any sampling parameter a request leaves out."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    penalty_window: int = 64  # how many recent tokens the repetition penalty looks at
    seed: int | None = None

    def __post_init__(self) -> None:
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", self.max_new_tokens)
        _require(self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)", self.temperature)
        _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _require(self.top_k >= 0, "top_k", "must be >= 0 (0 = no cut)", self.top_k)
        _require(self.repetition_penalty > 0, "repetition_penalty", "must be > 0", self.repetition_penalty)
        _require(self.penalty_window >= 0, "penalty_window", "must be >= 0", self.penalty_window)
        _require(self.seed is None or self.seed >= 0, "seed", "must be >= 0 or null", self.seed)


@dataclass(frozen=True)
class PacedConfig:
    """The `paced` load-testing engine: emits tokens at a fixed rate without computing a model."""

    tokens_per_second: float = 10.0  # 0 = as fast as possible: no wait between tokens
    first_token_delay_s: float = 0.7
    tokens_per_request: int = 64
    # Answer with the words of the last user turn, cycled, instead of "lorem ipsum ...": every
    # answer then depends on its request, so a test or a soak can tell that no client got another's text.
    echo: bool = False
    # Fault injection for tests and soaks, off unless a marker is set. A request whose last user turn
    # contains fail_marker gets an EngineError in place of its token number fault_at_token; one
    # containing hang_marker blocks there for good, deaf to cancel, as a stuck chip would (the
    # worker's step_timeout_s watchdog then ends the process).
    fail_marker: str | None = None
    hang_marker: str | None = None
    fault_at_token: int = 1
    # Prefill cost: prompt tokens computed per second before the first token (0 = not modelled). Like
    # a real engine with model.reuse_kv, it remembers the conversation it last served and charges
    # only for the turns a new prompt does not share with it.
    prefill_tokens_per_second: float = 0.0

    def __post_init__(self) -> None:
        _require(
            self.tokens_per_second >= 0,
            "tokens_per_second",
            "must be >= 0 (0 = as fast as possible)",
            self.tokens_per_second,
        )
        _require(
            self.first_token_delay_s >= 0, "first_token_delay_s", "must be >= 0", self.first_token_delay_s
        )
        _require(self.tokens_per_request >= 1, "tokens_per_request", "must be >= 1", self.tokens_per_request)
        for key, marker in (("fail_marker", self.fail_marker), ("hang_marker", self.hang_marker)):
            _require(marker is None or bool(marker.strip()), key, "must not be empty (null = off)", marker)
        _require(self.fault_at_token >= 1, "fault_at_token", "must be >= 1", self.fault_at_token)
        _require(
            self.prefill_tokens_per_second >= 0,
            "prefill_tokens_per_second",
            "must be >= 0 (0 = not modelled)",
            self.prefill_tokens_per_second,
        )


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    engine: str = "numpy"  # numpy | sail | paced
    # A bmodel file (sail), a Hugging Face folder or a .gguf file (numpy), or "builtin:smollm2".
    path: str = "builtin:smollm2"
    tokenizer: str | None = None  # a token_config folder; None = the one inside the model
    context_size: int = 2048  # numpy: KV-cache capacity in tokens; sail: read from the bmodel
    threads: int = 1  # BLAS threads per worker (numpy engine)
    # Keep the KV cache between requests: a prompt starting with what the cache holds (the next turn
    # of the same conversation) prefills only its new tokens. false = every prompt from token 0.
    reuse_kv: bool = True
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    paced: PacedConfig = field(default_factory=PacedConfig)
    # Where it runs, in a `models:` entry; null = workers.devices / workers.per_device.
    devices: tuple[int | str, ...] | None = None
    per_device: int | None = None

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "name", "must not be empty", self.name)
        _require(self.engine in ENGINES, "engine", f"must be one of {', '.join(ENGINES)}", self.engine)
        _require(bool(self.path.strip()), "path", "must not be empty", self.path)
        _require(
            self.tokenizer is None or bool(self.tokenizer.strip()),
            "tokenizer",
            "must not be empty",
            self.tokenizer,
        )
        _require(self.context_size >= 16, "context_size", "must be >= 16", self.context_size)
        _require(self.threads >= 1, "threads", "must be >= 1", self.threads)
        if self.devices is not None:
            _check_device_ids(self.devices)
        _require(
            self.per_device is None or self.per_device >= 0, "per_device", "must be >= 0", self.per_device
        )


@dataclass(frozen=True)
class RouterConfig:
    listen: str = "127.0.0.1:18000"  # gRPC address
    zmq_bind: str = "tcp://127.0.0.1:18100"  # where workers connect
    queue_size: int = 256  # waiting requests; beyond it new calls get RESOURCE_EXHAUSTED
    queue_timeout_s: float = 60.0  # a request waiting longer ends with DEADLINE_EXCEEDED
    heartbeat_interval_s: float = 1.0
    liveness: int = 3  # missed heartbeats after which a peer is considered dead
    drain_timeout_s: float = 30.0
    max_request_bytes: int = 1 << 20
    metrics_listen: str | None = None  # e.g. "127.0.0.1:9400"; None = no metrics endpoint
    event_loop: str = "uvloop"  # or "asyncio", the standard library's
    # Give a request to the idle worker whose KV cache holds the longest prefix of its conversation
    # (or the one its x-session-id last ran on); false = always the least recently used idle worker.
    cache_aware: bool = True
    # A plain-text port serving only grpc.health.v1, for probes that cannot speak TLS (Kubernetes').
    health_listen: str | None = None

    def __post_init__(self) -> None:
        _require_host_port("listen", self.listen)
        _require(
            self.zmq_bind.startswith(("tcp://", "ipc://")),
            "zmq_bind",
            "must be tcp://host:port or ipc://path",
            self.zmq_bind,
        )
        if self.zmq_bind.startswith("tcp://"):
            _require_host_port("zmq_bind", self.zmq_bind.removeprefix("tcp://"))
        _require(self.queue_size >= 1, "queue_size", "must be >= 1", self.queue_size)
        _require(self.queue_timeout_s > 0, "queue_timeout_s", "must be > 0", self.queue_timeout_s)
        _require(
            self.heartbeat_interval_s > 0, "heartbeat_interval_s", "must be > 0", self.heartbeat_interval_s
        )
        _require(self.liveness >= 2, "liveness", "must be >= 2", self.liveness)
        _require(self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0", self.drain_timeout_s)
        largest = MAX_FRAME_BYTES - _FRAME_HEADROOM_BYTES
        _require(
            0 < self.max_request_bytes <= largest,
            "max_request_bytes",
            f"must be in [1, {largest}]",
            self.max_request_bytes,
        )
        if self.metrics_listen is not None:
            _require_host_port("metrics_listen", self.metrics_listen)
        if self.health_listen is not None:
            _require_host_port("health_listen", self.health_listen)
        _require(
            self.event_loop in EVENT_LOOPS,
            "event_loop",
            f"must be one of {', '.join(EVENT_LOOPS)}",
            self.event_loop,
        )

    def worker_endpoint(self) -> str:
        """Where a worker on this host connects: zmq_bind with a wildcard host replaced by loopback."""
        for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
            if self.zmq_bind.startswith(wildcard):
                return "tcp://127.0.0.1:" + self.zmq_bind.removeprefix(wildcard)
        return self.zmq_bind


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP front (router/http/), in the router process beside gRPC."""

    listen: str | None = "127.0.0.1:8000"  # host:port; None = no HTTP front
    max_n: int = 8  # the largest `n` (choices per request) a client may ask for
    body_timeout_s: float = 10.0  # a request body still arriving after this is refused (408)

    def __post_init__(self) -> None:
        if self.listen is not None:
            _require_host_port("listen", self.listen)
        _require(self.max_n >= 1, "max_n", "must be >= 1", self.max_n)
        _require(self.body_timeout_s > 0, "body_timeout_s", "must be > 0", self.body_timeout_s)


@dataclass(frozen=True)
class WorkersConfig:
    # DEV_IDs, one worker group each: an id (2), or a group of chips for a bmodel compiled for
    # several devices ("0,1"; common/devices.py). No device may be in two entries.
    devices: tuple[int | str, ...] = (0,)
    per_device: int = 1
    restart_backoff_s: float = 0.5  # first restart delay; doubles per crash up to the max
    restart_backoff_max_s: float = 30.0
    stable_after_s: float = 10.0  # a worker that ran this long before dying starts a fresh backoff
    crash_loop_after: int = 3  # this many quick crashes in a row = crash loop: wait the max backoff
    stop_grace_s: float = 10.0  # SIGTERM -> SIGKILL; a stopping worker finishes its request for half of it
    reconnect_backoff_s: float = 0.25  # a worker that lost the router re-registers after this, doubling
    reconnect_backoff_max_s: float = 5.0
    step_timeout_s: float = 120.0  # an engine step (prefill included) running longer = hung worker: it exits
    # numpy engine: refuse to start more worker threads than the machine has cores, unless this is true.
    allow_cpu_oversubscription: bool = False

    def __post_init__(self) -> None:
        _require(len(self.devices) >= 1, "devices", "must list at least one device id", list(self.devices))
        _check_device_ids(self.devices)
        _require(self.per_device >= 1, "per_device", "must be >= 1", self.per_device)
        _require(self.restart_backoff_s > 0, "restart_backoff_s", "must be > 0", self.restart_backoff_s)
        _require(
            self.restart_backoff_max_s >= self.restart_backoff_s,
            "restart_backoff_max_s",
            "must be >= restart_backoff_s",
            self.restart_backoff_max_s,
        )
        _require(self.stable_after_s > 0, "stable_after_s", "must be > 0", self.stable_after_s)
        _require(self.crash_loop_after >= 1, "crash_loop_after", "must be >= 1", self.crash_loop_after)
        _require(self.stop_grace_s > 0, "stop_grace_s", "must be > 0", self.stop_grace_s)
        _require(self.reconnect_backoff_s > 0, "reconnect_backoff_s", "must be > 0", self.reconnect_backoff_s)
        _require(
            self.reconnect_backoff_max_s >= self.reconnect_backoff_s,
            "reconnect_backoff_max_s",
            "must be >= reconnect_backoff_s",
            self.reconnect_backoff_max_s,
        )
        _require(self.step_timeout_s > 0, "step_timeout_s", "must be > 0", self.step_timeout_s)

    @property
    def count(self) -> int:
        """Local worker processes the supervisor runs."""
        return len(self.devices) * self.per_device

    @property
    def groups(self) -> tuple[str, ...]:
        """The device groups in their one text form ("0", "0,1"), in config order."""
        return tuple(format_group(group_of(device)) for device in self.devices)


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the client-facing fronts (gRPC, and the HTTP and admin fronts). PEM files."""

    cert_file: str | None = None  # the server's certificate chain; set with key_file = TLS only
    key_file: str | None = None
    client_ca_file: str | None = None  # set = mutual TLS: clients need a certificate this CA signed

    def __post_init__(self) -> None:
        _require(
            (self.cert_file is None) == (self.key_file is None),
            "cert_file",
            "and key_file must be set together",
            (self.cert_file, self.key_file),
        )
        _require(
            self.client_ca_file is None or self.cert_file is not None,
            "client_ca_file",
            "needs cert_file and key_file (mutual TLS is TLS first)",
            self.client_ca_file,
        )

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class CurveConfig:
    """ZeroMQ CURVE on the worker link. One config serves both roles: the router reads its secret key
    and the allowlist, a worker its own secret key and the router's public key (scripts/keygen.py)."""

    enabled: bool = False
    router_secret_key: str = "/etc/bm-pool/curve/router.key_secret"  # the router only
    allowed_workers_dir: str = "/etc/bm-pool/curve/workers"  # the router only: workers' *.key files
    worker_secret_key: str = "/etc/bm-pool/curve/worker.key_secret"  # workers only
    router_public_key: str = "/etc/bm-pool/curve/router.key"  # workers only

    def __post_init__(self) -> None:
        for key in ("router_secret_key", "allowed_workers_dir", "worker_secret_key", "router_public_key"):
            _require(bool(getattr(self, key).strip()), key, "must not be empty", getattr(self, key))


@dataclass(frozen=True)
class SecurityConfig:
    """Who may use the fronts and who may join as a worker (common/security.py applies it)."""

    tls: TlsConfig = field(default_factory=TlsConfig)
    api_keys_file: str | None = None  # one key per line; set = every call needs `authorization: Bearer`
    # Keys for the admin API alone (clients' keys then cannot cordon or drain); null = api_keys_file's.
    admin_api_keys_file: str | None = None
    open_health: bool = True  # health checks need no key (probes cannot send one)
    curve: CurveConfig = field(default_factory=CurveConfig)
    # Only with this may the worker link run without CURVE on a non-loopback address.
    trusted_network: bool = False

    def __post_init__(self) -> None:
        _require(
            self.api_keys_file is None or bool(self.api_keys_file.strip()),
            "api_keys_file",
            "must not be empty (null = no keys)",
            self.api_keys_file,
        )
        _require(
            self.admin_api_keys_file is None or bool(self.admin_api_keys_file.strip()),
            "admin_api_keys_file",
            "must not be empty (null = the api_keys_file keys)",
            self.admin_api_keys_file,
        )


def _check_device_ids(devices: tuple[int | str, ...]) -> None:
    """Devices or device groups ("0,1"): ids >= 0, none repeated, none in two groups."""
    ids_ok = all(not isinstance(device, int) or device >= 0 for device in devices)
    _require(ids_ok, "devices", "must be ids >= 0", list(devices))
    _require(len(set(devices)) == len(devices), "devices", "must not repeat an id", list(devices))
    try:
        groups = [group_of(device) for device in devices]
    except DeviceGroupError as error:
        raise ConfigError("devices", f"{error} (in {list(devices)!r})") from None
    shared = overlapping(groups)
    _require(not shared, "devices", f"must not put device {shared[:1]} in two groups", list(devices))


@dataclass(frozen=True)
class AdminConfig:
    """The operators' gRPC admin service (protos/admin.proto, router/admin.py)."""

    listen: str = "127.0.0.1:18001"  # loopback; off it, give it security.admin_api_keys_file and TLS
    # The longest an operation waits to take effect (workers loading a model, requests finishing).
    operation_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _require_host_port("listen", self.listen)
        _require(self.operation_timeout_s > 0, "operation_timeout_s", "must be > 0", self.operation_timeout_s)


@dataclass(frozen=True)
class Placement:
    """One device of the pool: the model its workers run and how many of them."""

    device_id: str  # as the pool names a device everywhere: "0" (a device group: "0,1")
    model: ModelConfig
    workers: int


@dataclass(frozen=True)
class PoolConfig:
    router: RouterConfig = field(default_factory=RouterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    # Several models in one pool; the first is the default. Empty = the single `model`.
    models: tuple[ModelConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.models:
            object.__setattr__(self, "model", self.models[0])  # the default model
        names = [model.name for model in self.served_models]
        _require(len(set(names)) == len(names), "models", "must not repeat a name", names)
        owners: dict[int, str] = {}
        for model in self.served_models:
            for group in self._devices_of(model):
                for device in parse_group(group):
                    # A chip holds one bmodel at a time: two models on one device would fight over it.
                    _require(
                        device not in owners,
                        "models",
                        f"device {device} is given to both {owners.get(device)!r} and {model.name!r}",
                        names,
                    )
                    owners[device] = model.name

    @property
    def served_models(self) -> tuple[ModelConfig, ...]:
        return self.models or (self.model,)

    def model_named(self, name: str) -> ModelConfig | None:
        return next((model for model in self.served_models if model.name == name), None)

    def placements(self) -> list[Placement]:
        """Every configured device with its model and worker count, in config order."""
        return [
            Placement(
                group,
                model,
                self.workers.per_device if model.per_device is None else model.per_device,
            )
            for model in self.served_models
            for group in self._devices_of(model)
        ]

    def _devices_of(self, model: ModelConfig) -> tuple[str, ...]:
        """The model's devices as device groups in their one text form ("0", "0,1")."""
        devices = self.workers.devices if model.devices is None else model.devices
        return tuple(format_group(group_of(device)) for device in devices)


def model_settings(model: ModelConfig) -> ModelConfig:
    """What a worker of this model loads and serves: the model without where it runs. Workers whose
    model_settings changed must be replaced to apply the change."""
    return dataclasses.replace(model, devices=None, per_device=None)


def restart_only_changes(old: PoolConfig, new: PoolConfig) -> list[str]:
    """Settings that differ between two configs but take effect only when the process restarts."""
    changed = []
    for section in ("router", "admin"):
        before, after = getattr(old, section), getattr(new, section)
        for item in fields(before):
            was, now = getattr(before, item.name), getattr(after, item.name)
            if was != now:
                changed.append(f"{section}.{item.name}: {was!r} -> {now!r} (needs a restart)")
    return changed


def load_config(path: str | Path, environ: Mapping[str, str] = os.environ) -> PoolConfig:
    """Read a YAML file, apply MODEL_PATH / TOKENIZER_PATH / DEV_ID from `environ`, validate everything."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError("", f"cannot read config file {path}: {error.strerror or error}") from error
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError("", f"{path} is not valid YAML: {error}") from error
    if raw is None:
        raw = {}  # an empty file means "all defaults"
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    if "model" in raw and "models" in raw:
        raise ConfigError("models", "give either `model:` (one model) or `models:` (a list), not both")
    if "models" in raw and not raw["models"]:
        raise ConfigError("models", "must list at least one model")
    return _build(PoolConfig, _with_env_overrides(raw, environ), "")


def _with_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The seed's variables win over the file, as they did over the seed's built-in defaults."""
    merged = dict(raw)
    workers = _section(merged, "workers")
    if "models" not in merged:  # with several models, each names its own path
        model = _section(merged, "model")
        if environ.get("MODEL_PATH"):
            model["path"] = environ["MODEL_PATH"]
        if environ.get("TOKENIZER_PATH"):
            model["tokenizer"] = environ["TOKENIZER_PATH"]
    if environ.get("DEV_ID"):
        workers["devices"] = _parse_device_ids(environ["DEV_ID"])
    return merged


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of one section, put back into `raw`, so overrides never touch the parsed original."""
    section = raw.get(name)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(name, f"must be a mapping, got {section!r}")
    raw[name] = dict(section)
    return raw[name]


def _parse_device_ids(text: str) -> list[int | str]:
    """ "0,1,3": three one-chip workers (as the original server read it); "0,1;2,3": two device groups."""
    if ";" in text:
        groups = [part.strip() for part in text.split(";")]
        try:
            return [format_group(group_of(group)) for group in groups]
        except DeviceGroupError as error:
            raise ConfigError("DEV_ID", f"{error} (groups separated by ';', e.g. '0,1;2,3')") from None
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise ConfigError("DEV_ID", f"must be a device id or a comma-separated list of ids, got {text!r}")
    return [int(part) for part in parts]


def _build(cls: type, raw: object, path: str) -> Any:
    """Instantiate dataclass `cls` from a YAML mapping, checking keys and types on the way."""
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    values = {}
    for key, value in raw.items():
        key_path = _join(path, str(key))
        if key not in known:
            raise ConfigError(key_path, f"unknown key (expected one of: {', '.join(known)})")
        values[key] = _convert(hints[key], value, key_path)
    try:
        return cls(**values)
    except ConfigError as error:
        raise error.under(path) if path else error from None


def _convert(hint: Any, value: object, path: str) -> Any:
    if is_dataclass(hint):
        return _build(hint, value, path)
    if isinstance(hint, types.UnionType):  # `X | None`, or `int | str` (workers.devices)
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        hint = next((option for option in options if _is(option, value)), options[0])
    if typing.get_origin(hint) is tuple:
        (item_hint, _) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list of {_type_name(item_hint)}, got {value!r}")
        return tuple(_convert(item_hint, item, f"{path}[{index}]") for index, item in enumerate(value))
    return _scalar(hint, value, path)


def _type_name(hint: Any) -> str:
    return (
        " or ".join(arg.__name__ for arg in typing.get_args(hint))
        if isinstance(hint, types.UnionType)
        else hint.__name__
    )


def _is(hint: Any, value: object) -> bool:
    if typing.get_origin(hint) is tuple:  # `tuple[...] | None` (a model's devices)
        return isinstance(value, list)
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def _scalar(hint: type, value: object, path: str) -> object:
    # bool is an int in Python but `threads: true` is a mistake, never a number.
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    raise ConfigError(path, f"must be {names[hint]}, got {value!r}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
