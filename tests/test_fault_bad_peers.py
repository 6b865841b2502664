"""Fault: bad peers on the router's ZeroMQ port while clients are being served. Garbage frames,
wrong message types, chunks for unknown request ids, oversized messages, a peer that registers
twice with one id, a peer that takes a live worker's id: each is logged and dropped, the router
process survives, and every client gets exactly its own request's text (the pool echoes prompts).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import zmq

from common import wire
from protos import worker_pb2 as pb
from tests.fault_clients import (
    Outcome,
    assert_complete,
    assert_failed,
    registrations,
    run_streams,
    start_echo_pool,
    unique_prompt,
)
from tests.harness import Pool, inference_stub, wait_until


@contextmanager
def traffic(pool: Pool) -> Iterator[list[Outcome]]:
    """Clients streaming in rounds of six until the block ends; yields their outcomes."""
    outcomes: list[Outcome] = []
    stop = threading.Event()
    stub = inference_stub(pool.channel)

    def run() -> None:
        while not stop.is_set():
            outcomes.extend(run_streams(stub, [unique_prompt("client") for _ in range(6)]))

    thread = threading.Thread(target=run, name="traffic", daemon=True)
    thread.start()
    try:
        yield outcomes
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive(), "the client traffic hung"


class Peer:
    """A raw DEALER socket on the router's port, sending whatever the test says."""

    def __init__(self, context: zmq.Context, endpoint: str, routing_id: bytes) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        self.socket.connect(endpoint)

    def send(self, message: object) -> None:
        self.socket.send(wire.pack(message))

    def hello(self, worker_id: str, protocol_version: int = wire.PROTOCOL_VERSION) -> None:
        self.send(pb.Hello(protocol_version=protocol_version, worker_id=worker_id, model_id="rogue", pid=1))

    def expect(self, kind: str, containing: str = "") -> object:
        """The next message of `kind` from the router (other kinds skipped); for a Disconnect, the
        next whose reason contains `containing` (the router answers every message of a stranger)."""
        while self.socket.poll(10_000):
            got, message = wire.unpack(self.socket.recv())
            if got == kind and (kind != "disconnect" or containing in message.reason):
                return message
        raise AssertionError(f"no {kind} {containing!r} from the router")


@pytest.fixture
def zmq_context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def assert_own_text_or_explicit_failure(outcomes: list[Outcome]) -> None:
    assert outcomes, "no client was served during the test"
    for outcome in outcomes:
        if outcome.code == grpc.StatusCode.OK:
            assert_complete(outcome)
        else:  # a worker the router dropped because of a peer: explicit, and only its own text
            assert_failed(outcome, grpc.StatusCode.UNAVAILABLE, "was lost")


def test_garbage_and_wrong_messages_on_the_worker_port_are_dropped_while_clients_are_served(
    procs, tmp_path, zmq_context
):
    pool = start_echo_pool(procs, tmp_path)
    router = pool.router_process()
    endpoint = pool.config.zmq_endpoint
    workers_before = set(registrations(pool.supervisor))

    with traffic(pool) as outcomes:
        vandal = Peer(zmq_context, endpoint, b"vandal")
        for frames in ([b"\xff\x00garbage"], [b""], [b"two", b"frames"], [os.urandom(64)] * 20):
            vandal.socket.send_multipart(frames)
        vandal.socket.send(pb.Chunk(request_id="x", text="not an envelope").SerializeToString())
        vandal.send(pb.Generate(request_id="y"))  # a router-to-worker type, from a stranger
        vandal.send(pb.Chunk(request_id="0123456789abcdef", text="GHOST", completion_tokens=1))
        vandal.expect("disconnect", "not registered")
        vandal.hello("old-version", protocol_version=wire.PROTOCOL_VERSION + 1)
        vandal.expect("disconnect", "is not supported")
        vandal.hello("")
        vandal.expect("disconnect", "hello without a worker_id")

        # Oversized: ZeroMQ cuts the connection (ZMQ_MAXMSGSIZE) before the router reads it.
        Peer(zmq_context, endpoint, b"giant").socket.send(b"\x00" * (wire.MAX_FRAME_BYTES + 1))

        # Registered, then wrong: types workers never send, chunks for requests it does not run,
        # a second Hello on the same connection, and a second connection with the same id.
        rogue = Peer(zmq_context, endpoint, b"rogue")
        rogue.hello("rogue")
        rogue.expect("welcome")
        rogue.send(pb.Welcome())
        rogue.send(pb.Chunk(request_id="fedcba9876543210", text="INTRUDER", completion_tokens=1))
        rogue.hello("rogue")
        rogue.expect("welcome")
        twin = Peer(zmq_context, endpoint, b"rogue-twin")
        twin.hello("rogue")
        twin.expect("welcome")
        twin.send(pb.Disconnect(reason="done vandalising"))
        wait_until(
            lambda: "worker rogue (device 0) lost: it disconnected" in pool.supervisor.log(), "rogue gone"
        )
        wait_until(lambda: len(outcomes) >= 24, "clients served meanwhile")

    assert_own_text_or_explicit_failure(outcomes)
    log = pool.supervisor.log()
    for dropped in (
        "dropped a frame from peer b'vandal': undecodable frame",
        "dropped a message of 2 frames from peer b'vandal'",
        "from an unregistered peer: told it to register again",  # once per interval per peer
        "refused a hello from 'old-version': protocol version",
        "dropped a welcome message from worker rogue: workers do not send those",
        "dropped a chunk for request 'fedcba9876543210' from worker rogue",
        "a new process registered with the same worker id",
    ):
        assert dropped in log, dropped
    assert pool.router_process().pid == router.pid  # never crashed
    assert set(registrations(pool.supervisor)) - {"rogue"} == workers_before  # real workers never dropped
    for outcome in run_streams(inference_stub(pool.channel), [unique_prompt("after") for _ in range(4)]):
        assert_complete(outcome)


def test_a_peer_registering_with_a_live_workers_id_causes_no_cross_talk_and_the_worker_returns(
    procs, tmp_path, zmq_context
):
    pool = start_echo_pool(procs, tmp_path, tokens_per_second=50.0)
    victim, other = registrations(pool.supervisor)
    with traffic(pool) as outcomes:
        wait_until(lambda: len(outcomes) >= 6, "clients under way")
        impostor = Peer(zmq_context, pool.config.zmq_endpoint, b"impostor")
        impostor.hello(victim)
        impostor.expect("welcome")  # the router takes it for the victim, restarted
        # The impostor never answers nor heartbeats: whatever it is given comes back after the
        # liveness window, and the real worker registers again on its next heartbeat's answer.
        wait_until(lambda: registrations(pool.supervisor).count(victim) >= 3, "the real worker back")
        served = len(outcomes)
        wait_until(lambda: len(outcomes) >= served + 12, "more clients served")
    assert_own_text_or_explicit_failure(outcomes)
    for outcome in run_streams(inference_stub(pool.channel), [unique_prompt("after") for _ in range(6)]):
        assert_complete(outcome)
        assert outcome.worker_ids <= {victim, other}
