"""Deployment configuration: the YAML schema as typed dataclasses, loaded and validated in one place.

Every knob of the pool lives here with its default; a bad file fails with a message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class PacedConfig:
    """The `paced` load-testing engine: emits tokens at a fixed rate without computing a model."""

    tokens_per_second: float = 10.0
    first_token_delay_s: float = 0.7
    tokens_per_request: int = 64


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    engine: str = "numpy"  # numpy | sail | paced
    # A bmodel file (sail), a Hugging Face folder or a .gguf file (numpy), or "builtin:smollm2".
    path: str = "builtin:smollm2"
    tokenizer: str | None = None  # a token_config folder; None = the one inside the model
    context_size: int = 2048  # numpy: KV-cache capacity in tokens; sail: read from the bmodel
    threads: int = 1  # BLAS threads per worker (numpy engine)
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    paced: PacedConfig = field(default_factory=PacedConfig)


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


@dataclass(frozen=True)
class WorkersConfig:
    devices: tuple[int, ...] = (0,)  # DEV_IDs
    per_device: int = 1
    restart_backoff_s: float = 0.5  # first restart delay; doubles per crash up to the max
    restart_backoff_max_s: float = 30.0


@dataclass(frozen=True)
class PoolConfig:
    router: RouterConfig = field(default_factory=RouterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
