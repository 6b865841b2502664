"""The admin API (protos/admin.proto) as the tests call it, and a reading of its status."""

from __future__ import annotations

from collections.abc import Sequence

from protos import admin_pb2, admin_pb2_grpc
from tests.harness import open_channel


class Admin:
    """The admin API of a pool, as a test calls it."""

    def __init__(self, address: str) -> None:
        self.channel = open_channel(address)
        self.stub = admin_pb2_grpc.PoolAdminStub(self.channel)

    def status(self) -> admin_pb2.PoolStatus:
        return self.stub.Status(admin_pb2.StatusRequest(), timeout=30)

    def scale(self, device: str, workers: int) -> admin_pb2.OperationReply:
        return self.stub.Scale(admin_pb2.ScaleRequest(device_id=device, workers=workers), timeout=120)

    def scale_model(self, model: str, workers: int) -> admin_pb2.OperationReply:
        return self.stub.Scale(admin_pb2.ScaleRequest(model=model, workers=workers), timeout=120)

    def cordon(self, device: str) -> admin_pb2.OperationReply:
        return self.stub.Cordon(admin_pb2.DeviceRequest(device_id=device), timeout=30)

    def uncordon(self, device: str) -> admin_pb2.OperationReply:
        return self.stub.Uncordon(admin_pb2.DeviceRequest(device_id=device), timeout=30)

    def reload(self) -> admin_pb2.ReloadReply:
        return self.stub.Reload(admin_pb2.ReloadRequest(), timeout=120)


def workers_on(
    status: admin_pb2.PoolStatus, device: str, states: Sequence[str] = ("idle", "busy", "cordoned")
) -> list[admin_pb2.WorkerStatus]:
    """The registered workers of a device in one of `states` (default: those serving or able to)."""
    return [worker for worker in status.workers if worker.device_id == device and worker.state in states]
