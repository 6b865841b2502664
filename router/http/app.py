"""The HTTP front's aiohttp application and server, on the router's own event loop.

Routes:
  POST /v1/chat/completions, POST /v1/completions   router/http/completions.py
  GET  /v1/models, GET /v1/models/{id}              the served model(s)
  GET  /health                                      200 while serving, 503 with no worker or draining
  GET  /metrics                                     the router's Prometheus registry (both fronts)
  GET  /pool/status                                 the pool as JSON, for the page
  GET  /                                            the page (router/http/static/), no build step

Errors anywhere (an unknown path or method included) are OpenAI error objects. `middlewares` given
to create_app run inside the one that formats errors, so a check added there (API keys) refuses
with ApiError and is answered like any other error.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.calls import REQUEST_ID_KEY
from router.http.completions import complete
from router.http.errors import ApiError
from router.http.front import Front
from router.http.openai_requests import Endpoint

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
OWNER = "bm1684x-pool"  # a model's `owned_by`


def create_app(front: Front, middlewares: Iterable[Middleware] = ()) -> web.Application:
    # Bodies are read by completions.py with its own limit check; aiohttp's is the same limit.
    app = web.Application(
        middlewares=[_openai_errors, *middlewares], client_max_size=front.limits.max_request_bytes
    )
    routes = _Routes(front)
    app.add_routes(
        [
            web.post(Endpoint.CHAT.value, routes.chat),
            web.post(Endpoint.TEXT.value, routes.text),
            web.get("/v1/models", routes.models),
            web.get("/v1/models/{model:.+}", routes.model),
            web.get("/health", routes.health),
            web.get("/metrics", routes.metrics),
            web.get("/pool/status", routes.status),
            web.get("/", routes.page),
            web.static("/static", STATIC, append_version=False),
        ]
    )
    return app


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error.response(request.headers.get(REQUEST_ID_KEY))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        outcome = grpc.StatusCode.NOT_FOUND if error.status == 404 else grpc.StatusCode.INVALID_ARGUMENT
        message = f"{request.method} {request.path}: {error.reason}"
        answer = ApiError(outcome, message, status=error.status)
        response = answer.response(request.headers.get(REQUEST_ID_KEY))
        if "Allow" in error.headers:
            response.headers["Allow"] = error.headers["Allow"]
        return response


class _Routes:
    def __init__(self, front: Front) -> None:
        self._front = front

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await complete(request, self._front, Endpoint.CHAT)

    async def text(self, request: web.Request) -> web.StreamResponse:
        return await complete(request, self._front, Endpoint.TEXT)

    async def models(self, _request: web.Request) -> web.Response:
        data = [self._model(name) for name in self._front.served_models()]
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self._front.served_models():
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                f"the model {name!r} does not exist here",
                param="model",
                code="model_not_found",
            )
        return web.json_response(self._model(name))

    async def health(self, _request: web.Request) -> web.Response:
        front = self._front
        workers = front.registry.ready_count
        if front.is_draining():
            status, code = "draining", 503
        elif workers == 0:
            status, code = "no_worker", 503
        else:
            status, code = "serving", 200
        return web.json_response({"status": status, "workers": workers}, status=code)

    async def metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._front.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, _request: web.Request) -> web.Response:
        front = self._front
        snapshot = front.scheduler.snapshot()
        workers = [
            {
                "worker_id": w.worker_id,
                "device_id": w.device_id,
                "model_id": w.model_id,
                "state": w.state.value,
            }
            for w in front.registry.workers()
        ]
        return web.json_response(
            {
                "model": front.models.default_name,
                "draining": front.is_draining(),
                "queue_length": snapshot.queued,
                "running": snapshot.running,
                "tokens_relayed": front.metrics.tokens_relayed,
                "time": time.monotonic(),
                "workers": workers,
            }
        )

    async def page(self, _request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    def _model(self, name: str) -> dict[str, Any]:
        model = {"id": name, "object": "model", "created": self._front.started_unix, "owned_by": OWNER}
        # As vLLM reports it, for clients that size their prompts: the context of a worker serving it.
        contexts = [w.context_size for w in self._front.registry.workers() if w.model_id == name]
        if contexts:
            model["max_model_len"] = min(contexts)
        return model


class HttpServer:
    """The app served on host:port until stop(); binding errors are OSError naming the address."""

    def __init__(
        self,
        front: Front,
        address: str,
        middlewares: Iterable[Middleware] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._app = create_app(front, middlewares)
        self._address = address
        self._ssl_context = ssl_context  # None = plain HTTP
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, shutdown_timeout_s: float) -> None:
        # handler_cancellation: a client that disconnects cancels its handler, which cancels its job.
        # No access log: the router writes its own line per call (router/calls.py).
        runner = web.AppRunner(
            self._app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout_s
        )
        await runner.setup()
        self._runner = runner
        host, _, port = self._address.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=self._ssl_context)
        try:
            await site.start()
        except OSError as error:
            raise OSError(f"cannot listen for HTTP on {self._address}: {error}") from error
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
