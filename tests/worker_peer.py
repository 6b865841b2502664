"""The router's side of the worker wire protocol, driven step by step by a test: a ZeroMQ ROUTER
socket bound where a real `python -m worker` connects (tests/test_worker_service.py, and the hung
worker tests of tests/test_fault_hung_worker.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import zmq

from common import wire
from protos import worker_pb2 as pb
from tests.harness import WAIT_S, ConfigFile, ManagedProcess, ProcessSet, start_worker

WORKER_ID = "test-worker-1"
HELLO_TIMEOUT_S = 30.0  # the worker imports, loads its engine, then says hello: slow on a busy CI box


class RouterPeer:
    """The router's side of the wire, driven by the test. While `keepalive` is on, it heartbeats the
    worker every 100 ms whenever it waits, as a live router would."""

    def __init__(self, endpoint: str) -> None:
        self._context = zmq.Context()
        self.socket = self._context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker keeps its routing id
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.worker = WORKER_ID.encode()
        self.keepalive = False
        self._last_heartbeat = 0.0

    def close(self) -> None:
        self.socket.close()
        self._context.term()

    def send(self, message: Any) -> None:
        self.socket.send_multipart([self.worker, wire.pack(message)])

    def send_raw(self, *frames: bytes) -> None:
        self.socket.send_multipart([self.worker, *frames])

    def receive(self, timeout: float = WAIT_S) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.keepalive and time.monotonic() - self._last_heartbeat > 0.1:
                self.send(pb.Heartbeat())
                self._last_heartbeat = time.monotonic()
            if self.socket.poll(50):
                identity, frame = self.socket.recv_multipart()
                assert identity == self.worker
                return wire.unpack(frame)
        raise AssertionError(f"nothing from the worker within {timeout:.0f} s")

    def expect(self, kind: str, timeout: float = WAIT_S, skip: tuple[str, ...] = ("heartbeat",)) -> Any:
        """The next message of `kind`, skipping heartbeats (or the kinds in `skip`)."""
        while True:
            got, message = self.receive(timeout)
            if got == kind:
                return message
            assert got in skip, f"expected {kind}, got {got}: {message}"

    def register(self, interval_ms: int = 200, liveness: int = 3, *, keepalive: bool = False) -> pb.Hello:
        hello = self.expect("hello", HELLO_TIMEOUT_S)
        self.send(pb.Welcome(heartbeat_interval_ms=interval_ms, liveness=liveness))
        self.keepalive = keepalive
        return hello

    def chunks_until_final(self, request_id: str) -> list[pb.Chunk]:
        """Chunks of `request_id` up to and including its final one (heartbeats skipped)."""
        chunks = []
        while True:
            chunk = self.expect("chunk")
            assert chunk.request_id == request_id, (
                f"chunk of {chunk.request_id} while waiting for {request_id}"
            )
            chunks.append(chunk)
            if chunk.finish_reason != pb.FINISH_NONE:
                return chunks

    def assert_serves_a_short_request(
        self, request_id: str, text: str = "hello there", tokens: int = 2
    ) -> None:
        """A request of a few tokens runs to its length: the worker is serving again."""
        self.send(generate(request_id, text, max_new_tokens=tokens))
        assert self.chunks_until_final(request_id)[-1].finish_reason == pb.FINISH_LENGTH


def generate(request_id: str, text: str = "hello there", **params: Any) -> pb.Generate:
    return pb.Generate(
        request_id=request_id,
        system_message="You are a helpful assistant.",
        history=[pb.Turn(role=1, content=text)],
        params=pb.SamplingParams(**params),
    )


@contextlib.contextmanager
def connected(
    procs: ProcessSet, config: ConfigFile, dev_id: int = 0, *extra: str
) -> Iterator[tuple[RouterPeer, ManagedProcess]]:
    """A worker started against a bound RouterPeer, which is closed at the end."""
    peer = RouterPeer(config.zmq_endpoint)
    try:
        yield peer, start_worker(procs, config, dev_id, "--worker-id", WORKER_ID, *extra)
    finally:
        peer.close()
