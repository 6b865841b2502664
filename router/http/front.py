"""What the HTTP front shares with the gRPC front: the router's scheduler, workers, metrics, limits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from common.config import HttpConfig
from router.metrics import PoolMetrics
from router.models import ServedModels
from router.scheduler import Scheduler
from router.validation import RequestLimits
from router.workers import WorkerRegistry

HTTP_FRONT = "http"  # the `front` of its calls in logs and metrics


@dataclass(frozen=True)
class Front:
    scheduler: Scheduler
    registry: WorkerRegistry
    metrics: PoolMetrics
    limits: RequestLimits
    config: HttpConfig
    is_draining: Callable[[], bool]
    models: ServedModels  # which model a request goes to, shared with the gRPC front
    started_unix: int = 0  # reported as the models' `created`

    def served_models(self) -> list[str]:
        """The configured models, then any other model a registered worker serves."""
        return self.models.names()
