"""The operators' gRPC service (protos/admin.proto) on its own address, admin.listen.

It is a separate grpc.aio server, so the admin API is never reachable on the public port unless
admin.listen says so; it has the standard health service and reflection (grpcurl can list and
describe it). Authentication is not done here: `interceptors` (e.g. an API-key check) are passed
in, in one place, by RouterServer. Until one is configured the loopback default is the
protection.

Refusals map to statuses: unknown device or model NOT_FOUND, a bad argument or an invalid config
file INVALID_ARGUMENT, refused by the pool (CPU core budget, no host agent) FAILED_PRECONDITION,
not finished in time DEADLINE_EXCEEDED; the message always says why.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from protos import admin_pb2, admin_pb2_grpc
from router.operations import OperationError, Operations, Refusal

log = logging.getLogger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["PoolAdmin"].full_name
_CODES = {
    Refusal.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.REFUSED: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class AdminServicer(admin_pb2_grpc.PoolAdminServicer):
    def __init__(self, operations: Operations, timeout_s: float) -> None:
        self._operations = operations
        self._timeout_s = timeout_s

    async def Status(
        self, request: admin_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PoolStatus:
        return self._operations.status()

    async def Scale(
        self, request: admin_pb2.ScaleRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.OperationReply:
        target = request.WhichOneof("target")
        if target is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "scale needs a device_id or a model")
        timeout_s = self._time_left(context)
        if target == "device_id":
            action = self._operations.scale_device(request.device_id, request.workers, timeout_s)
        else:
            action = self._operations.scale_model(request.model, request.workers, timeout_s)
        return await self._reply(context, f"scale {getattr(request, target)} {request.workers}", action)

    async def Cordon(
        self, request: admin_pb2.DeviceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.OperationReply:
        cordon = self._operations.cordon
        return await self._reply(
            context, f"cordon {request.device_id}", _now(lambda: cordon(request.device_id))
        )

    async def Uncordon(
        self, request: admin_pb2.DeviceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.OperationReply:
        uncordon = self._operations.uncordon
        return await self._reply(
            context, f"uncordon {request.device_id}", _now(lambda: uncordon(request.device_id))
        )

    async def Drain(
        self, request: admin_pb2.DeviceRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.DrainProgress]:
        try:
            async for progress in self._operations.drain(request.device_id, self._time_left(context)):
                yield progress
        except OperationError as error:
            log.warning("admin: drain %s refused: %s", request.device_id, error.message)
            await context.abort(_CODES[error.refusal], error.message)
        log.info("admin: drain %s: done", request.device_id)

    async def Reload(
        self, request: admin_pb2.ReloadRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReloadReply:
        try:
            changes, not_live = await self._operations.reload(self._time_left(context))
        except OperationError as error:
            log.warning("admin: reload refused: %s", error.message)
            await context.abort(_CODES[error.refusal], error.message)
        for setting in not_live:
            log.warning("admin: reload: not applied, %s", setting)
        log.info("admin: reload: %s", "; ".join(changes) or "nothing changed")
        return admin_pb2.ReloadReply(changes=changes, not_live=not_live, status=self._operations.status())

    async def _reply(
        self, context: grpc.aio.ServicerContext, what: str, action: Awaitable[str]
    ) -> admin_pb2.OperationReply:
        try:
            message = await action
        except OperationError as error:
            log.warning("admin: %s refused: %s", what, error.message)
            await context.abort(_CODES[error.refusal], error.message)
        log.info("admin: %s: %s", what, message)
        return admin_pb2.OperationReply(message=message, status=self._operations.status())

    def _time_left(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self._timeout_s if remaining is None else min(self._timeout_s, remaining)


async def _now(operation: Callable[[], str]) -> str:
    """A synchronous operation as an awaitable, so every call goes through one error mapping."""
    return operation()


async def build_admin_server(
    operations: Operations, timeout_s: float, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
) -> grpc.aio.Server:
    """A gRPC server with PoolAdmin, health (SERVING) and reflection; the caller binds and starts it."""
    server = grpc.aio.server(interceptors=list(interceptors), options=[("grpc.so_reuseport", 0)])
    admin_pb2_grpc.add_PoolAdminServicer_to_server(AdminServicer(operations, timeout_s), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (ADMIN_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    for service in ("", ADMIN_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server
