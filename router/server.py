"""The router process assembled: gRPC server, health, reflection, worker socket and scheduler, and
the OpenAI-compatible HTTP front (router/http/) on the same event loop when http.listen is set.

RouterServer owns the pieces and their lifetimes. Health (`grpc.health.v1`, for the overall
server "" and for "InferenceService") is SERVING while at least one worker is registered and
NOT_SERVING with none or once draining has begun; "liveness" is SERVING while the process runs.
health_listen adds a plain-text port with the health service alone, for probes that cannot speak
TLS. TLS, API keys and CURVE come from common/security.py. Reflection lists the inference, health and
reflection services, so grpcurl can discover and call them. Prometheus metrics (router/metrics.py)
are collected always and served over HTTP on metrics_listen when it is set. Given the whole pool
config, it also serves the operators' admin API (router/admin.py) on admin.listen, and knows the
pool's models (router/models.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from common.config import HttpConfig, PoolConfig, RouterConfig, SecurityConfig
from common.security import HTTP_OPEN_PATHS, FrontSecurity, check_worker_link, warn_if_plaintext
from protos import inference_pb2
from router.admin import build_admin_server
from router.agents import AgentRegistry
from router.cache_policy import CachePolicy
from router.http.app import HttpServer, Middleware
from router.http.front import Front
from router.metrics import PoolMetrics
from router.models import ServedModels
from router.operations import OperationError, Operations
from router.scheduler import Scheduler, Snapshot
from router.service import InferenceServicer
from router.transport import Transport
from router.validation import RequestLimits, parse_request
from router.workers import WorkerRegistry

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
# A health "service" SERVING while the process runs, workers or not: a liveness probe checks it
# (the overall status is NOT_SERVING without workers, which must not get the router restarted).
LIVENESS_SERVICE = "liveness"
# The gRPC layer's own size limit sits a little above max_request_bytes: requests between the two
# reach validation and get a clear INVALID_ARGUMENT, anything bigger is cut off by gRPC itself.
GRPC_MESSAGE_HEADROOM_BYTES = 64 << 10
# After a drain (or its timeout), calls still open get this long to deliver their last status.
STOP_GRACE_S = 1.0


class RouterServer:
    def __init__(
        self,
        config: RouterConfig,
        limits: RequestLimits,
        http: HttpConfig | None = None,
        model_name: str = "",
        http_middlewares: tuple[Middleware, ...] = (),
        security: SecurityConfig | None = None,
        *,
        pool: PoolConfig | None = None,
        config_path: Path | None = None,
        admin_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        """`model_name`: the served model without a `pool` (tests of the request path); `pool`: the
        whole config, for the models and the admin API (None: neither); `config_path`: the file an admin
        reload re-reads."""
        self._config = config
        self._security_config = security or SecurityConfig()
        self._health_server: grpc.aio.Server | None = None
        self._limits = limits
        self._http_config = http  # None or listen None: no HTTP front
        self._model_name = model_name
        self._http_middlewares = http_middlewares
        self._http: HttpServer | None = None
        self._pool = pool
        self._config_path = config_path
        self._admin_interceptors = admin_interceptors
        self._admin_server: grpc.aio.Server | None = None
        self.admin_port = 0
        self._draining = False
        self._stopped = False
        self._tasks: list[asyncio.Task[None]] = []
        self._transport: Transport | None = None
        self._server: grpc.aio.Server | None = None
        self.failed = asyncio.Event()  # a background loop died: the process should exit
        self.metrics = PoolMetrics()
        self.metrics_port = 0  # the HTTP metrics endpoint's port; 0 = not served
        self.grpc_port = 0
        self.http_port = 0  # 0 = no HTTP front
        self.health_port = 0  # the plain-text health-only port (health_listen); 0 = not served
        self.zmq_endpoint = ""

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self._config
        check_worker_link(config.zmq_bind, self._security_config)
        self.security = FrontSecurity.load(self._security_config, self.metrics.on_refused)
        self._transport = Transport(config.zmq_bind, self._security_config.curve, self.metrics.on_refused)
        self.zmq_endpoint = self._transport.endpoint
        cache_policy = CachePolicy(self.metrics) if config.cache_aware else None
        self._registry = WorkerRegistry(
            self._transport, config.heartbeat_interval_s, config.liveness, self.metrics, cache_policy
        )
        self._scheduler = Scheduler(self._registry, config.queue_size, config.queue_timeout_s, self.metrics)
        self._agents = AgentRegistry(
            self._transport, self._registry, config.heartbeat_interval_s, config.liveness
        )
        if self._pool is not None:
            configured = [model.name for model in self._pool.served_models]
        else:
            configured = [self._model_name] if self._model_name else []
        self.models = ServedModels(  # which model a request goes to: every front asks it
            configured,
            lambda: (worker.model_id for worker in self._registry.workers()),
            listed=bool(self._pool and self._pool.models),
        )
        self.metrics.follow(self._scheduler.snapshot, self._registry.workers)
        if config.metrics_listen is not None:
            self.metrics_port = self.metrics.serve(config.metrics_listen)
            log.info("serving Prometheus metrics on %s", config.metrics_listen)
        self._health = health_aio.HealthServicer()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._server = self._build_grpc_server()
        self.grpc_port = _bind(self._server, config.listen, "gRPC", self.security)
        await self._server.start()
        if self._pool is not None:
            await self._start_admin(self._pool)
        if config.health_listen is not None:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            self.health_port = _bind(self._health_server, config.health_listen, "gRPC health")
            await self._health_server.start()
        await self._start_http()
        self._spawn(self._transport.run(self._receive), "worker socket")
        self._spawn(self._registry.run_heartbeats(), "heartbeats")
        self._spawn(self._agents.run_heartbeats(), "agent heartbeats")
        self._spawn(self._follow_health(), "health")
        log.info(
            "serving gRPC on port %d (%s), workers connect to %s",
            self.grpc_port,
            config.listen,
            self.zmq_endpoint,
        )

    async def _start_admin(self, pool: PoolConfig) -> None:
        self._operations = operations = Operations(
            self._registry, self._scheduler, self._agents, self.models, pool, self._config_path
        )
        interceptors = [*self.security.admin_grpc_interceptors(), *self._admin_interceptors]
        self._admin_server = await build_admin_server(
            operations, pool.admin.operation_timeout_s, interceptors
        )
        self.admin_port = _bind(self._admin_server, pool.admin.listen, "the admin API", self.security)
        await self._admin_server.start()
        log.info("serving the admin API on port %d (%s)", self.admin_port, pool.admin.listen)

    async def _start_http(self) -> None:
        http = self._http_config
        if http is None or http.listen is None:
            return
        front = Front(
            scheduler=self._scheduler,
            registry=self._registry,
            metrics=self.metrics,
            limits=self._limits,
            config=http,
            is_draining=lambda: self._draining,
            models=self.models,
            started_unix=int(time.time()),
        )
        # With API keys set, the API needs a key; the page's files hold nothing and stay open
        # (the page itself goes with health: open unless open_health is false).
        guards = self.security.http_middlewares((*HTTP_OPEN_PATHS, "/"), open_prefixes=("/static/",))
        ssl_context = self.security.ssl_context()
        warn_if_plaintext("HTTP", http.listen, self._security_config.tls)
        self._http = HttpServer(front, http.listen, (*guards, *self._http_middlewares), ssl_context)
        await self._http.start(STOP_GRACE_S)
        self.http_port = self._http.port
        log.info("serving the OpenAI-compatible HTTP front on port %d (%s)", self.http_port, http.listen)

    def reload_security(self) -> None:
        """Re-read the TLS files, API keys and worker allowlist (SIGHUP)."""
        self.security.reload()
        if self._transport is not None and self._transport.curve is not None:
            self._transport.curve.reload()

    def snapshot(self) -> Snapshot:
        return self._scheduler.snapshot()

    def reload(self) -> None:
        """SIGHUP: re-read the key material and the config file's models."""
        self.reload_security()
        self.reload_config()

    def reload_config(self) -> None:
        """Re-read the config file for the router's own part (models, default model)."""
        if self._pool is None:
            return
        try:
            changes, not_live = self._operations.reload_router_config()
        except OperationError as error:
            log.error("reload refused: %s", error.message)
            return
        for setting in not_live:
            log.warning("reload: not applied, %s", setting)
        log.info("reload: %s", "; ".join(changes) or "nothing changed for the router")

    def _receive(self, identity: bytes, kind: str, message: Message) -> None:
        """A message on the ZeroMQ socket: host agents' traffic to the agents, the rest to the workers."""
        if self._agents.handles(identity, kind):
            self._agents.receive(identity, kind, message)
        else:
            self._registry.receive(identity, kind, message)

    async def drain(self) -> None:
        """Stop accepting calls, let open ones finish (up to drain_timeout_s), then stop."""
        self._draining = True
        await self._health.enter_graceful_shutdown()
        timeout_s = self._config.drain_timeout_s
        log.info("draining: %d open calls, waiting up to %g s", self.snapshot().open_calls, timeout_s)
        try:
            await asyncio.wait_for(self._scheduler.wait_all_closed(), timeout_s)
        except TimeoutError:
            log.warning("drain timeout: ending %d open calls", self.snapshot().open_calls)
            self._scheduler.fail_all(
                grpc.StatusCode.UNAVAILABLE,
                f"the router shut down: its drain timeout ({timeout_s:g} s) ran out",
            )
        await self.stop()

    async def stop(self) -> None:
        """Stop at once: open calls are cut after a short grace, the worker socket is closed."""
        if self._stopped:
            return
        self._stopped = True
        if self._admin_server is not None:
            await self._admin_server.stop(STOP_GRACE_S)
        if self._server is not None:
            await self._server.stop(STOP_GRACE_S)
        if self._http is not None:
            await self._http.stop()
        if self._health_server is not None:
            await self._health_server.stop(0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._transport is not None:
            self._transport.close()
        await self.metrics.close()
        log.info("router stopped")

    def _build_grpc_server(self) -> grpc.aio.Server:
        server = grpc.aio.server(
            interceptors=self.security.grpc_interceptors(),
            options=[
                (
                    "grpc.max_receive_message_length",
                    self._limits.max_request_bytes + GRPC_MESSAGE_HEADROOM_BYTES,
                ),
                ("grpc.so_reuseport", 0),  # a second router on the same port must fail, not share it
            ],
        )
        servicer = InferenceServicer(
            self._scheduler, self._limits, lambda: self._draining, self.metrics, self.models
        )
        _add_inference_service(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                INFERENCE_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        return server

    async def _follow_health(self) -> None:
        changed = self._registry.changed
        while True:
            await changed.wait()
            changed.clear()
            serving = self._registry.ready_count > 0
            await self._set_health(
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", INFERENCE_SERVICE):
            await self._health.set(service, status)

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        task.add_done_callback(self._on_task_done)
        self._tasks.append(task)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("the router's %s loop died", task.get_name(), exc_info=task.exception())
            self.failed.set()


def _add_inference_service(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """As the generated add_InferenceServiceServicer_to_server, but with parse_request as the request
    deserializer, so that undecodable bytes get INVALID_ARGUMENT (not UNKNOWN and a traceback)."""
    serialize = inference_pb2.Completion.SerializeToString
    handlers = {
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete, request_deserializer=parse_request, response_serializer=serialize
        ),
        "StreamComplete": grpc.unary_stream_rpc_method_handler(
            servicer.StreamComplete, request_deserializer=parse_request, response_serializer=serialize
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(INFERENCE_SERVICE, handlers),))
    server.add_registered_method_handlers(INFERENCE_SERVICE, handlers)


def _bind(server: grpc.aio.Server, address: str, what: str, security: FrontSecurity | None = None) -> int:
    """Bind one of the router's gRPC servers; `security`: TLS when it has a certificate, None = a
    plain-text port (health only). Returns the port."""
    try:
        if security is None:
            port = server.add_insecure_port(address)
        else:
            port = security.add_port(server, address, what)
    except RuntimeError as error:
        raise OSError(f"cannot listen for {what} on {address}: {error}") from error
    if port == 0:
        raise OSError(f"cannot listen for {what} on {address}")
    return port
