"""The worker registry (router/workers.py) on its own, in process: a real WorkerRegistry on a real
Transport (a ZeroMQ ROUTER socket on loopback), with the workers played by the test's DEALER sockets
speaking real protobuf messages (protos/worker.proto). The test drives the registry's public methods
and reads what it does: what each peer is sent, what its listener is told, its counts, the metrics
and the log lines operators read.

No router server and no process is started, so each test takes milliseconds: fast enough for
mutation testing (scripts/mutate.py runs router/workers.py against this file; every test of the
whole router spins up a server, ~15 s per mutant). Liveness is checked by calling check_liveness
with chosen times on records whose clock fields the test set, so no test waits for a heartbeat
interval (except the one of run_heartbeats itself)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq
import zmq.asyncio
from google.protobuf.message import Message

from common import wire
from common.prefix_hash import conversation_hashes
from protos import worker_pb2 as pb
from router.cache_policy import CachePolicy
from router.metrics import PoolMetrics
from router.transport import Transport
from router.workers import MAX_LOST_RECORDS, MAX_REFUSED_PEERS, WorkerRecord, WorkerRegistry, WorkerState
from tests.router_harness import async_test

WAIT_S = 5.0  # upper bound of a wait for a message (never reached when things work)
SYSTEM = "You are a helpful assistant."
RETIRE_REASON = "its device was scaled down, drained or reloaded"
MARKER = "marker"  # busy_request_id of the heartbeat that ends what a peer was sent


@dataclass
class Recorder:
    """The registry's listener, as the scheduler would be: records what it is told."""

    events: list[tuple[str, ...]] = field(default_factory=list)
    records: list[WorkerRecord] = field(default_factory=list)

    def worker_ready(self, worker: WorkerRecord) -> None:
        self.events.append(("ready", worker.worker_id))
        self.records.append(worker)

    def worker_lost(self, worker: WorkerRecord, cause: str) -> None:
        self.events.append(("lost", worker.worker_id, cause))
        self.records.append(worker)

    def chunk(self, worker: WorkerRecord, chunk: pb.Chunk) -> None:
        self.events.append(("chunk", worker.worker_id, chunk.request_id, chunk.text))


class Peer:
    """A worker's DEALER socket, driven by the test."""

    def __init__(self, endpoint: str, identity: bytes) -> None:
        self.identity = identity
        self.socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTING_ID, identity)
        self.socket.connect(endpoint)

    def send(self, message: Message) -> None:
        self.socket.send(wire.pack(message))

    async def receive(self) -> tuple[str, Any]:
        return wire.unpack(await asyncio.wait_for(self.socket.recv(), WAIT_S))


@dataclass
class Pool:
    transport: Transport
    registry: WorkerRegistry
    metrics: PoolMetrics
    listener: Recorder
    policy: CachePolicy | None
    peers: list[Peer] = field(default_factory=list)
    delivered: int = 0  # messages the transport handed to the registry
    errors: list[BaseException] = field(default_factory=list)

    def on_message(self, identity: bytes, kind: str, message: Message) -> None:
        """The transport's callback, as RouterServer._receive wires it; an error fails the test."""
        try:
            self.registry.receive(identity, kind, message)
        except Exception as error:
            self.errors.append(error)
            raise
        finally:
            self.delivered += 1

    def peer(self, identity: bytes) -> Peer:
        peer = Peer(self.transport.endpoint, identity)
        self.peers.append(peer)
        return peer

    async def deliver(self, peer: Peer, message: Message) -> None:
        """Send `message` from `peer` and wait until the registry has handled it."""
        before = self.delivered
        peer.send(message)
        deadline = time.monotonic() + WAIT_S
        while self.delivered == before:
            assert time.monotonic() < deadline, "the message never reached the registry"
            await asyncio.sleep(0.001)
        assert not self.errors, f"the registry raised: {self.errors!r}"

    async def sent_to(self, peer: Peer) -> list[tuple[str, Any]]:
        """Everything the registry sent `peer` so far (and not read yet): a marker sent now arrives
        after all of it."""
        self.transport.send(peer.identity, pb.Heartbeat(busy_request_id=MARKER))
        received = []
        while (got := await peer.receive())[0] != "heartbeat" or got[1].busy_request_id != MARKER:
            received.append(got)
        return received

    async def register(self, worker_id: str, **fields: Any) -> tuple[Peer, WorkerRecord]:
        """A peer that sent a Hello and got its Welcome; its record in the registry."""
        peer = self.peer(fields.pop("identity", worker_id.encode()))
        await self.deliver(peer, hello(worker_id, **fields))
        assert [kind for kind, _ in await self.sent_to(peer)] == ["welcome"]
        return peer, self.worker(worker_id)

    def worker(self, worker_id: str) -> WorkerRecord:
        (worker,) = [w for w in self.registry.workers() if w.worker_id == worker_id and w.state != LOST]
        return worker

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(f"bm_pool_{name}_total", labels) or 0.0


LOST = WorkerState.LOST


def hello(worker_id: str, **fields: Any) -> pb.Hello:
    settings: dict[str, Any] = {
        "protocol_version": wire.PROTOCOL_VERSION,
        "worker_id": worker_id,
        "device_id": 0,
        "model_id": "test-model",
        "context_size": 4096,
        "pid": 1234,
    }
    settings.update(fields)
    return pb.Hello(**settings)


def held_after_turn_one() -> list[int]:
    return conversation_hashes(
        SYSTEM, [pb.Turn(role=1, content="question"), pb.Turn(role=2, content="answer")]
    )


def turn_two(session_id: str = "") -> pb.Generate:
    history = [
        pb.Turn(role=1, content="question"),
        pb.Turn(role=2, content="answer"),
        pb.Turn(role=1, content="next question"),
    ]
    return pb.Generate(request_id="r1", system_message=SYSTEM, history=history, session_id=session_id)


@contextlib.asynccontextmanager
async def running_pool(
    interval_s: float = 1.0, liveness: int = 3, *, cache_aware: bool = False
) -> AsyncIterator[Pool]:
    transport = Transport("tcp://127.0.0.1:*")
    metrics = PoolMetrics()
    policy = CachePolicy(metrics) if cache_aware else None
    registry = WorkerRegistry(transport, interval_s, liveness, metrics, policy)
    listener = Recorder()
    registry.set_listener(listener)
    pool = Pool(transport, registry, metrics, listener, policy)
    task = asyncio.create_task(transport.run(pool.on_message))
    try:
        yield pool
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for peer in pool.peers:
            peer.socket.close()
        transport.close()
    assert not pool.errors, f"the registry raised: {pool.errors!r}"


def workers_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "router.workers"]


# -- registration ------------------------------------------------------------------------------------


@async_test
async def test_a_hello_is_welcomed_with_the_heartbeat_interval_and_liveness():
    async with running_pool(interval_s=1.5, liveness=4) as pool:
        peer = pool.peer(b"w1")
        await pool.deliver(peer, hello("w1"))
        assert await pool.sent_to(peer) == [("welcome", pb.Welcome(heartbeat_interval_ms=1500, liveness=4))]
        assert pool.listener.events == [("ready", "w1")]
        assert (pool.registry.ready_count, pool.registry.idle_count, pool.registry.lost_count) == (1, 1, 0)
        assert pool.registry.silence_limit_s == 6.0


@async_test
async def test_a_registered_worker_is_recorded_as_its_hello_describes_it():
    async with running_pool() as pool:
        before = time.monotonic()
        _, worker = await pool.register(
            "w1", device_id=3, model_id="qwen", context_size=512, pid=77, host="h1"
        )
        assert (worker.identity, worker.worker_id, worker.device_id, worker.device_key) == (
            b"w1",
            "w1",
            "3",
            "3",
        )
        assert (worker.model_id, worker.context_size, worker.pid, worker.host) == ("qwen", 512, 77, "h1")
        assert (worker.state, worker.restarts, worker.retiring, worker.slot) == (
            WorkerState.IDLE,
            0,
            False,
            0,
        )
        assert before <= worker.registered_at == worker.last_seen == worker.last_sent <= time.monotonic()
        assert pool.listener.records == [worker]
        assert pool.registry.workers() == [worker]


@async_test
async def test_a_device_group_is_the_workers_device():
    async with running_pool() as pool:
        _, worker = await pool.register("w1", device_id=0, device_group="0,1")
        assert (worker.device_id, worker.device_key) == ("0,1", "0,1")
        assert pool.count("worker_registrations", device_id="0,1") == 1.0


@async_test
async def test_a_registration_is_logged_counted_and_signalled(caplog):
    caplog.set_level(logging.INFO, logger="router.workers")
    async with running_pool() as pool:
        assert not pool.registry.changed.is_set()
        await pool.register("w1", device_id=2, context_size=2048, pid=42)
        assert workers_log(caplog) == [
            "worker w1 registered: device 2, model test-model, context 2048, pid 42"
        ]
        assert pool.count("worker_registrations", device_id="2") == 1.0
        assert pool.count("worker_restarts", device_id="2") == 0.0
        assert pool.registry.changed.is_set()


@async_test
async def test_a_restarted_worker_says_so_once(caplog):
    caplog.set_level(logging.INFO, logger="router.workers")
    async with running_pool() as pool:
        peer, first = await pool.register("w1", restarts=2)
        assert first.restarts == 2
        # The same Hello again before the Welcome arrived: a re-registration, not another restart.
        await pool.deliver(peer, hello("w1", restarts=2))
        assert [kind for kind, _ in await pool.sent_to(peer)] == ["welcome"]
        assert workers_log(caplog) == [
            "worker w1 registered: device 0, model test-model, context 4096, pid 1234"
            " (restart 2 of its slot)",
            "worker w1 (device 0) lost: it sent a new hello (reconnected or restarted)",
            "worker w1 registered: device 0, model test-model, context 4096, pid 1234",
        ]
        assert pool.count("worker_restarts", device_id="0") == 1.0
        assert pool.count("worker_registrations", device_id="0") == 2.0


@async_test
async def test_a_lost_worker_registering_as_restarted_is_not_counted_as_a_restart():
    async with running_pool() as pool:
        _, worker = await pool.register("w1")
        pool.registry.drop(worker, "gone")
        await pool.register("w1", identity=b"w1-new", restarts=1)
        assert pool.count("worker_restarts", device_id="0") == 0.0


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (
            {"protocol_version": wire.PROTOCOL_VERSION - 1},
            f"protocol version {wire.PROTOCOL_VERSION - 1} is not supported: "
            f"this router speaks version {wire.PROTOCOL_VERSION}",
        ),
        ({"worker_id": ""}, "hello without a worker_id"),
        ({"device_group": "1,0"}, "device_group '1,0' is not written as sorted ids such as '0,1'"),
        (
            {"device_group": "0,x"},
            "device_group: a device group is a device id or comma-separated ids such as 0,1, got '0,x'",
        ),
    ],
)
@async_test
async def test_a_hello_that_cannot_be_accepted_is_refused_with_the_reason(fields, reason, caplog):
    caplog.set_level(logging.INFO, logger="router.workers")
    async with running_pool() as pool:
        peer = pool.peer(b"w1")
        settings = {"worker_id": "w1", **fields}
        await pool.deliver(peer, hello(**settings))
        assert await pool.sent_to(peer) == [("disconnect", pb.Disconnect(reason=reason))]
        assert workers_log(caplog) == [f"refused a hello from {settings['worker_id']!r}: {reason}"]
        assert pool.listener.events == []
        assert (pool.registry.ready_count, pool.registry.idle_count, pool.registry.lost_count) == (0, 0, 0)
        assert pool.count("worker_registrations", device_id="0") == 0.0


@async_test
async def test_a_registered_peer_sending_a_refused_hello_is_dropped_without_a_second_disconnect():
    async with running_pool() as pool:
        peer, worker = await pool.register("w1")
        await pool.deliver(peer, hello("w1", protocol_version=1))
        reason = f"protocol version 1 is not supported: this router speaks version {wire.PROTOCOL_VERSION}"
        assert await pool.sent_to(peer) == [("disconnect", pb.Disconnect(reason=reason))]
        assert pool.listener.events[-1] == ("lost", "w1", "it sent a new hello (reconnected or restarted)")
        assert worker.state is WorkerState.LOST
        assert (pool.registry.ready_count, pool.registry.lost_count) == (0, 1)


@async_test
async def test_a_new_process_under_the_same_worker_id_replaces_the_old_one_silently():
    async with running_pool() as pool:
        old_peer, old = await pool.register("w1", identity=b"old")
        _, new = await pool.register("w1", identity=b"new", pid=99)
        assert pool.listener.events == [
            ("ready", "w1"),
            ("lost", "w1", "a new process registered with the same worker id (restarted)"),
            ("ready", "w1"),
        ]
        assert await pool.sent_to(old_peer) == []  # no Disconnect: it is the same worker, restarted
        assert (old.state, new.state, new.pid) == (WorkerState.LOST, WorkerState.IDLE, 99)
        # The new registration takes the lost record's place: no trace of the old process is left.
        assert pool.registry.workers() == [new]
        assert (pool.registry.ready_count, pool.registry.idle_count, pool.registry.lost_count) == (1, 1, 0)
        assert pool.count("worker_losses", device_id="0") == 1.0
        assert pool.registry.take_idle() is new


@async_test
async def test_a_worker_registering_forgets_the_lost_one_of_its_device_with_the_most_similar_id():
    async with running_pool() as pool:
        for worker_id, device in (("host-w-1", 0), ("host-w-12", 0), ("host-w-123", 1), ("other", 0)):
            await pool.register(worker_id, device_id=device)
        for worker in pool.registry.workers():
            pool.registry.drop(worker, "gone")
        await pool.register("host-w-1234", device_id=0)
        lost = [w.worker_id for w in pool.registry.workers() if w.state is LOST]
        assert lost == ["host-w-1", "host-w-123", "other"]
        await pool.register("host-w-9", device_id=0)
        assert [w.worker_id for w in pool.registry.workers()] == [
            "host-w-1234",
            "host-w-9",
            "host-w-123",
            "other",
        ]
        assert pool.registry.lost_count == 2


@async_test
async def test_a_lost_id_that_is_a_prefix_of_the_new_one_counts_all_its_characters_as_shared():
    async with running_pool() as pool:
        for worker_id in ("abz", "abc"):
            await pool.register(worker_id)
        for worker in pool.registry.workers():
            pool.registry.drop(worker, "gone")
        await pool.register("abcd")
        assert [w.worker_id for w in pool.registry.workers() if w.state is LOST] == ["abz"]


@async_test
async def test_a_lost_worker_coming_back_on_another_device_leaves_no_lost_record():
    async with running_pool() as pool:
        _, worker = await pool.register("w1", device_id=0)
        pool.registry.drop(worker, "gone")
        _, back = await pool.register("w1", identity=b"w1-again", device_id=1)
        assert pool.registry.workers() == [back]
        assert pool.registry.lost_count == 0


@async_test
async def test_workers_get_the_emptiest_heartbeat_slot():
    async with running_pool() as pool:
        for index in range(21):
            pool.registry.receive(f"fake-{index}".encode(), "hello", hello(f"w{index}"))
        slots = [worker.slot for worker in pool.registry.workers()]
        assert slots == [*range(20), 0]
        pool.registry.drop(pool.worker("w5"), "gone")
        pool.registry.receive(b"fake-new", "hello", hello("new"))
        assert pool.worker("new").slot == 5


# -- messages from registered workers -------------------------------------------------------------


@async_test
async def test_a_chunk_reaches_the_listener_and_counts_as_a_sign_of_life():
    async with running_pool() as pool:
        peer, worker = await pool.register("w1")
        worker.last_seen = 0.0
        before = time.monotonic()
        await pool.deliver(peer, pb.Chunk(request_id="r1", text="hi", completion_tokens=1))
        assert pool.listener.events[-1] == ("chunk", "w1", "r1", "hi")
        assert worker.last_seen >= before


@async_test
async def test_a_heartbeat_counts_as_a_sign_of_life_and_is_not_answered(caplog):
    caplog.set_level(logging.INFO, logger="router.workers")
    async with running_pool() as pool:
        peer, worker = await pool.register("w1")
        worker.last_seen = 0.0
        before = time.monotonic()
        await pool.deliver(peer, pb.Heartbeat())
        assert worker.last_seen >= before
        assert await pool.sent_to(peer) == []
        assert pool.listener.events == [("ready", "w1")]
        assert len(workers_log(caplog)) == 1  # the registration only


@async_test
async def test_a_message_workers_do_not_send_is_dropped_with_a_warning(caplog):
    async with running_pool() as pool:
        peer, worker = await pool.register("w1")
        worker.last_seen = 0.0
        caplog.set_level(logging.INFO, logger="router.workers")
        await pool.deliver(peer, pb.Generate(request_id="r1"))
        assert workers_log(caplog) == ["dropped a generate message from worker w1: workers do not send those"]
        assert worker.last_seen > 0.0
        assert await pool.sent_to(peer) == []
        assert pool.registry.ready_count == 1


@pytest.mark.parametrize(
    ("reason", "cause"),
    [("shutting down", "it disconnected: shutting down"), ("", "it disconnected: no reason given")],
)
@async_test
async def test_a_worker_that_disconnects_is_dropped_as_lost(reason, cause, caplog):
    async with running_pool() as pool:
        peer, worker = await pool.register("w1")
        caplog.set_level(logging.INFO, logger="router.workers")
        await pool.deliver(peer, pb.Disconnect(reason=reason))
        assert pool.listener.events[-1] == ("lost", "w1", cause)
        assert workers_log(caplog) == [f"worker w1 (device 0) lost: {cause}"]
        assert await pool.sent_to(peer) == [("disconnect", pb.Disconnect(reason=cause))]
        assert worker.state is LOST


# -- unregistered peers -----------------------------------------------------------------------------


@async_test
async def test_an_unregistered_peer_is_told_to_register_once_per_interval(caplog):
    caplog.set_level(logging.INFO, logger="router.workers")
    async with running_pool() as pool:
        peer = pool.peer(b"stranger")
        await pool.deliver(peer, pb.Chunk(request_id="r1"))
        await pool.deliver(peer, pb.Heartbeat())
        assert await pool.sent_to(peer) == [
            ("disconnect", pb.Disconnect(reason="not registered: send a hello"))
        ]
        assert workers_log(caplog) == ["a chunk from an unregistered peer: told it to register again"]
        assert pool.listener.events == []
        assert pool.registry.ready_count == 0


@async_test
async def test_an_unregistered_peer_is_told_again_after_an_interval():
    async with running_pool(interval_s=0.1) as pool:
        peer = pool.peer(b"stranger")
        await pool.deliver(peer, pb.Heartbeat())
        await asyncio.sleep(0.15)
        await pool.deliver(peer, pb.Heartbeat())
        assert [kind for kind, _ in await pool.sent_to(peer)] == ["disconnect", "disconnect"]


@async_test
async def test_an_unregistered_peer_that_disconnects_is_not_answered(caplog):
    caplog.set_level(logging.INFO, logger="router.workers")
    async with running_pool() as pool:
        peer = pool.peer(b"stranger")
        await pool.deliver(peer, pb.Disconnect(reason="bye"))
        assert await pool.sent_to(peer) == []
        assert workers_log(caplog) == []


@async_test
async def test_the_refused_peers_remembered_are_bounded_oldest_first():
    async with running_pool() as pool:
        peer = pool.peer(b"stranger")
        await pool.deliver(peer, pb.Heartbeat())
        for index in range(MAX_REFUSED_PEERS - 1):  # the table is full, the stranger still in it
            pool.registry.receive(f"fake-{index}".encode(), "heartbeat", pb.Heartbeat())
        await pool.deliver(peer, pb.Heartbeat())
        assert [kind for kind, _ in await pool.sent_to(peer)] == ["disconnect"]
        pool.registry.receive(b"one-more", "heartbeat", pb.Heartbeat())  # the stranger is forgotten
        await pool.deliver(peer, pb.Heartbeat())
        assert [kind for kind, _ in await pool.sent_to(peer)] == ["disconnect"]


@async_test
async def test_a_peer_refused_again_is_the_newest_in_the_bounded_table():
    async with running_pool(interval_s=0.5) as pool:
        peer = pool.peer(b"stranger")
        await pool.deliver(peer, pb.Heartbeat())
        pool.registry.receive(b"fake-first", "heartbeat", pb.Heartbeat())
        await asyncio.sleep(0.6)
        await pool.deliver(peer, pb.Heartbeat())  # refused again: now the newest entry
        for index in range(MAX_REFUSED_PEERS - 1):  # pushes out fake-first, not the stranger
            pool.registry.receive(f"fake-{index}".encode(), "heartbeat", pb.Heartbeat())
        await pool.deliver(peer, pb.Heartbeat())
        assert [kind for kind, _ in await pool.sent_to(peer)] == ["disconnect", "disconnect"]


# -- dispatch: idle workers -----------------------------------------------------------------------


@async_test
async def test_idle_workers_are_taken_least_recently_used_first():
    async with running_pool() as pool:
        workers = [(await pool.register(name))[1] for name in ("w1", "w2", "w3")]
        first = pool.registry.take_idle()
        assert first is workers[0] and first.state is WorkerState.BUSY
        assert pool.registry.idle_count == 2
        pool.registry.release(first)
        assert first.state is WorkerState.IDLE
        assert [pool.registry.take_idle() for _ in range(3)] == [workers[1], workers[2], workers[0]]
        assert pool.registry.take_idle() is None
        assert pool.registry.idle_count == 0


@async_test
async def test_take_idle_takes_only_a_worker_of_the_requested_model():
    async with running_pool() as pool:
        _, a = await pool.register("a", model_id="model-a")
        _, b = await pool.register("b", model_id="model-b")
        assert pool.registry.take_idle("model-b") is b
        assert pool.registry.take_idle("model-b") is None
        assert pool.registry.take_idle("model-c") is None
        assert pool.registry.take_idle(None) is a


@async_test
async def test_releasing_a_worker_that_is_not_busy_changes_nothing():
    async with running_pool() as pool:
        _, worker = await pool.register("w1")
        pool.registry.release(worker)
        assert pool.registry.idle_count == 1
        taken = pool.registry.take_idle()
        pool.registry.drop(taken, "gone")
        pool.registry.release(taken)
        assert (taken.state, pool.registry.idle_count) == (LOST, 0)


@async_test
async def test_without_a_cache_policy_a_generate_gets_the_least_recently_used_worker():
    async with running_pool() as pool:
        _, first = await pool.register("w1")
        await pool.register("w2", held_prefix=held_after_turn_one())
        assert pool.registry.take_idle(None, turn_two()) is first


@async_test
async def test_the_cache_policy_prefers_the_worker_holding_the_conversation():
    async with running_pool(cache_aware=True) as pool:
        await pool.register("w1")
        _, holder = await pool.register("w2", held_prefix=held_after_turn_one())
        assert pool.registry.take_idle(None, turn_two()) is holder
        assert holder.state is WorkerState.BUSY and pool.registry.idle_count == 1
        assert pool.count("cache_dispatches", match="prefix") == 1.0


@async_test
async def test_the_cache_policy_chooses_among_the_idle_workers_of_the_model_only():
    async with running_pool(cache_aware=True) as pool:
        _, plain = await pool.register("w1", model_id="model-a")
        await pool.register("w2", model_id="model-b", held_prefix=held_after_turn_one())
        assert pool.registry.take_idle("model-a", turn_two()) is plain
        assert pool.count("cache_dispatches", match="none") == 1.0


@async_test
async def test_a_take_without_a_generate_does_not_consult_the_cache_policy():
    async with running_pool(cache_aware=True) as pool:
        _, first = await pool.register("w1")
        await pool.register("w2", held_prefix=held_after_turn_one())
        assert pool.registry.take_idle() is first
        assert pool.count("cache_dispatches", match="none") == 0.0
        assert pool.count("cache_dispatches", match="prefix") == 0.0


@async_test
async def test_a_session_goes_back_to_the_worker_it_was_dispatched_to():
    async with running_pool(cache_aware=True) as pool:
        _, first = await pool.register("w1")
        await pool.register("w2")
        request = pb.Generate(request_id="r1", system_message=SYSTEM, session_id="chat-1")
        assert pool.registry.take_idle(None, request) is first
        pool.registry.release(first)  # now the most recently used
        assert pool.registry.take_idle(None, request) is first
        assert pool.count("cache_dispatches", match="session") == 1.0


@async_test
async def test_a_final_chunk_reports_what_the_worker_holds():
    async with running_pool(cache_aware=True) as pool:
        await pool.register("w1")
        peer, second = await pool.register("w2")
        held = held_after_turn_one()
        await pool.deliver(peer, pb.Chunk(request_id="r0", finish_reason=pb.FINISH_STOP, held_prefix=held))
        assert pool.registry.take_idle(None, turn_two()) is second


@async_test
async def test_a_chunk_that_is_not_final_leaves_what_the_worker_holds():
    async with running_pool(cache_aware=True) as pool:
        await pool.register("w1")
        peer, holder = await pool.register("w2", held_prefix=held_after_turn_one())
        await pool.deliver(peer, pb.Chunk(request_id="r0", text="x", completion_tokens=1))
        assert pool.registry.take_idle(None, turn_two()) is holder


@async_test
async def test_an_error_chunk_clears_what_the_worker_holds():
    async with running_pool(cache_aware=True) as pool:
        _, first = await pool.register("w1")
        peer, _ = await pool.register("w2", held_prefix=held_after_turn_one())
        await pool.deliver(peer, pb.Chunk(request_id="r0", error_kind=pb.ERROR_ENGINE, error_message="boom"))
        assert pool.registry.take_idle(None, turn_two()) is first


@async_test
async def test_a_final_chunk_without_a_cache_policy_reaches_the_listener():
    async with running_pool() as pool:
        peer, _ = await pool.register("w1")
        await pool.deliver(peer, pb.Chunk(request_id="r0", text="end", finish_reason=pb.FINISH_STOP))
        assert pool.listener.events[-1] == ("chunk", "w1", "r0", "end")


# -- cordons ----------------------------------------------------------------------------------------


@async_test
async def test_a_cordoned_device_gets_no_new_work_and_uncordoning_frees_its_idle_workers():
    async with running_pool() as pool:
        _, zero = await pool.register("w0", device_id=0)
        _, one = await pool.register("w1", device_id=1)
        pool.registry.cordon("0")
        assert pool.registry.is_cordoned("0") and not pool.registry.is_cordoned("1")
        assert pool.registry.idle_count == 1
        assert pool.registry.take_idle() is one
        assert pool.registry.take_idle() is None
        pool.registry.uncordon("0")
        assert not pool.registry.is_cordoned("0")
        assert pool.listener.events[-1] == ("ready", "w0")
        assert pool.registry.take_idle() is zero


@async_test
async def test_a_worker_of_a_cordoned_device_that_finishes_stays_out_of_the_idle_list():
    async with running_pool() as pool:
        _, worker = await pool.register("w0", device_group="0,1")
        assert pool.registry.take_idle() is worker
        pool.registry.cordon("0,1")
        pool.registry.release(worker)
        assert (worker.state, pool.registry.idle_count) == (WorkerState.IDLE, 0)
        pool.registry.uncordon("0,1")
        assert pool.registry.idle_count == 1


@async_test
async def test_a_worker_registering_on_a_cordoned_device_is_not_idle():
    async with running_pool() as pool:
        pool.registry.cordon("0")
        await pool.register("w0")
        assert (pool.registry.ready_count, pool.registry.idle_count) == (1, 0)
        assert pool.listener.events == [("ready", "w0")]


@async_test
async def test_uncordoning_frees_only_the_idle_workers_of_that_device():
    async with running_pool() as pool:
        _, busy = await pool.register("busy", device_id=0)
        await pool.register("idle", device_id=0)
        _, other = await pool.register("other", device_id=1)
        assert pool.registry.take_idle() is busy
        pool.registry.cordon("0")
        pool.registry.cordon("1")
        pool.registry.uncordon("0")
        assert pool.listener.events[-1] == ("ready", "idle")
        assert pool.listener.events.count(("ready", "busy")) == 1
        assert pool.registry.idle_count == 1
        assert pool.registry.take_idle() is pool.worker("idle")
        assert other.state is WorkerState.IDLE and pool.registry.take_idle() is None


# -- retiring ----------------------------------------------------------------------------------------


@async_test
async def test_a_retired_worker_is_told_once_and_gets_no_new_work(caplog):
    async with running_pool() as pool:
        peer, worker = await pool.register("w1", device_id=2)
        caplog.set_level(logging.INFO, logger="router.workers")
        worker.last_sent = 0.0
        before = time.monotonic()
        pool.registry.retire(worker)
        pool.registry.retire(worker)
        assert await pool.sent_to(peer) == [("retire", pb.Retire(reason=RETIRE_REASON))]
        assert workers_log(caplog) == ["worker w1 (device 2): retiring"]
        assert worker.retiring and worker.last_sent >= before
        assert pool.registry.idle_count == 0 and pool.registry.take_idle() is None


@async_test
async def test_a_busy_retiring_worker_is_not_idle_when_it_finishes():
    async with running_pool() as pool:
        _, worker = await pool.register("w1")
        pool.registry.take_idle()
        pool.registry.retire(worker)
        pool.registry.release(worker)
        assert pool.registry.idle_count == 0
        pool.registry.uncordon("0")
        assert pool.registry.idle_count == 0


@async_test
async def test_retiring_a_worker_no_longer_registered_sends_nothing():
    async with running_pool() as pool:
        peer, worker = await pool.register("w1")
        pool.registry.drop(worker, "gone", tell_peer=False)
        pool.registry.retire(worker)
        assert await pool.sent_to(peer) == []
        assert not worker.retiring


@async_test
async def test_a_retiring_worker_that_says_goodbye_leaves_without_being_lost(caplog):
    async with running_pool() as pool:
        peer, worker = await pool.register("w1", device_id=2)
        pool.registry.retire(worker)
        await pool.sent_to(peer)
        pool.registry.changed.clear()
        caplog.set_level(logging.INFO, logger="router.workers")
        await pool.deliver(peer, pb.Disconnect(reason="retired"))
        assert workers_log(caplog) == ["worker w1 (device 2) retired: it left the pool"]
        assert pool.listener.events[-1] == ("lost", "w1", "it retired")
        assert pool.registry.changed.is_set()
        assert await pool.sent_to(peer) == []
        assert pool.registry.workers() == []
        assert (pool.registry.ready_count, pool.registry.idle_count, pool.registry.lost_count) == (0, 0, 0)
        assert pool.count("worker_losses", device_id="2") == 0.0
        # Gone for good: its slot is free, a message from it is refused as from a stranger.
        await pool.deliver(peer, pb.Heartbeat())
        assert [kind for kind, _ in await pool.sent_to(peer)] == ["disconnect"]
        pool.registry.receive(b"fake", "hello", hello("w2"))
        assert pool.worker("w2").slot == 0


@async_test
async def test_a_retired_or_lost_worker_leaves_nothing_in_the_cache_policy():
    async with running_pool(cache_aware=True) as pool:
        peer, retiring = await pool.register("w1", held_prefix=held_after_turn_one())
        _, lost = await pool.register("w2", held_prefix=held_after_turn_one())
        pool.registry.retire(retiring)
        await pool.deliver(peer, pb.Disconnect(reason="retired"))
        pool.registry.drop(lost, "gone")
        assert pool.policy is not None
        assert (pool.policy._held, pool.policy._holders) == ({}, {})  # nothing kept for the departed


@async_test
async def test_a_busy_retiring_worker_that_leaves_is_reported_to_the_listener():
    async with running_pool() as pool:
        peer, worker = await pool.register("w1")
        pool.registry.take_idle()
        pool.registry.retire(worker)
        await pool.deliver(peer, pb.Disconnect())
        assert pool.listener.events[-1] == ("lost", "w1", "it retired")
        # Forgotten: the same id registering as a restarted process is a restart, not a re-registration.
        await pool.register("w1", identity=b"again", restarts=1)
        assert pool.registry.ready_count == 1 and pool.registry.idle_count == 1
        assert pool.count("worker_restarts", device_id="0") == 1.0


# -- dropping ----------------------------------------------------------------------------------------


@async_test
async def test_a_dropped_worker_is_told_why_remembered_as_lost_and_counted(caplog):
    async with running_pool() as pool:
        peer, worker = await pool.register("w1", device_id=1)
        await pool.register("w2", device_id=1)
        pool.registry.changed.clear()
        caplog.set_level(logging.INFO, logger="router.workers")
        pool.registry.drop(worker, "it hung")
        assert await pool.sent_to(peer) == [("disconnect", pb.Disconnect(reason="it hung"))]
        assert workers_log(caplog) == ["worker w1 (device 1) lost: it hung"]
        assert pool.listener.events[-1] == ("lost", "w1", "it hung")
        assert pool.listener.records[-1] is worker
        assert worker.state is LOST and pool.registry.changed.is_set()
        assert (pool.registry.ready_count, pool.registry.idle_count, pool.registry.lost_count) == (1, 1, 1)
        assert pool.registry.workers() == [pool.worker("w2"), worker]
        assert pool.count("worker_losses", device_id="1") == 1.0
        assert pool.registry.take_idle() is pool.worker("w2")


@async_test
async def test_a_worker_dropped_without_telling_the_peer_is_sent_nothing():
    async with running_pool() as pool:
        peer, worker = await pool.register("w1")
        pool.registry.drop(worker, "replaced", tell_peer=False)
        assert await pool.sent_to(peer) == []
        assert pool.listener.events[-1] == ("lost", "w1", "replaced")


@async_test
async def test_dropping_a_worker_twice_or_a_stale_record_does_nothing():
    async with running_pool() as pool:
        peer, worker = await pool.register("w1")
        pool.registry.drop(worker, "first")
        pool.registry.drop(worker, "second")
        assert [kind for kind, _ in await pool.sent_to(peer)] == ["disconnect"]
        assert pool.listener.events == [("ready", "w1"), ("lost", "w1", "first")]
        assert pool.count("worker_losses", device_id="0") == 1.0


@async_test
async def test_a_message_from_a_dropped_worker_is_refused():
    async with running_pool() as pool:
        peer, worker = await pool.register("w1")
        pool.registry.drop(worker, "gone", tell_peer=False)
        await pool.deliver(peer, pb.Chunk(request_id="r1"))
        assert await pool.sent_to(peer) == [
            ("disconnect", pb.Disconnect(reason="not registered: send a hello"))
        ]
        assert pool.listener.events[-1] == ("lost", "w1", "gone")


@async_test
async def test_lost_workers_remembered_are_bounded_oldest_first():
    async with running_pool() as pool:
        # each on its own device, so no registration takes a lost one's place
        for index in range(MAX_LOST_RECORDS + 1):
            identity = f"fake-{index}".encode()
            pool.registry.receive(identity, "hello", hello(f"w{index}", device_id=index))
            pool.registry.receive(identity, "disconnect", pb.Disconnect())
            expected = min(index + 1, MAX_LOST_RECORDS)
            assert pool.registry.lost_count == expected
        remembered = [worker.worker_id for worker in pool.registry.workers()]
        assert remembered == [f"w{index}" for index in range(1, MAX_LOST_RECORDS + 1)]


# -- sends and liveness -------------------------------------------------------------------------


@async_test
async def test_a_message_sent_to_a_worker_reaches_it_and_is_noted():
    async with running_pool() as pool:
        peer, worker = await pool.register("w1")
        worker.last_sent = 0.0
        before = time.monotonic()
        pool.registry.send(worker, pb.Cancel(request_id="r1"))
        assert worker.last_sent >= before
        assert await pool.sent_to(peer) == [("cancel", pb.Cancel(request_id="r1"))]


async def quiet_worker(pool: Pool, worker_id: str, **fields: Any) -> tuple[Peer, WorkerRecord]:
    """A registered worker last heard from and last sent to at t = 100 s."""
    peer, worker = await pool.register(worker_id, **fields)
    worker.last_seen = worker.last_sent = 100.0
    return peer, worker


@async_test
async def test_a_worker_quiet_for_half_an_interval_gets_a_heartbeat_once():
    async with running_pool(interval_s=1.0, liveness=3) as pool:
        peer, worker = await quiet_worker(pool, "w1")
        pool.registry.check_liveness(0, 100.4)
        assert await pool.sent_to(peer) == []
        pool.registry.check_liveness(0, 100.5)
        assert await pool.sent_to(peer) == [("heartbeat", pb.Heartbeat())]
        assert worker.last_sent == 100.5
        pool.registry.check_liveness(0, 100.9)
        assert await pool.sent_to(peer) == []
        assert pool.registry.ready_count == 1 and pool.listener.events == [("ready", "w1")]


@async_test
async def test_a_worker_silent_past_the_liveness_window_is_dropped_and_told():
    async with running_pool(interval_s=1.0, liveness=3) as pool:
        peer, worker = await quiet_worker(pool, "w1")
        worker.last_sent = 103.0  # not due a heartbeat: only the silence counts
        pool.registry.check_liveness(0, 103.0)
        assert pool.registry.ready_count == 1 and await pool.sent_to(peer) == []
        pool.registry.check_liveness(0, 103.5)
        cause = "no message for 3.5 s (liveness 3 x 1 s heartbeat interval)"
        assert await pool.sent_to(peer) == [("disconnect", pb.Disconnect(reason=cause))]
        assert pool.listener.events[-1] == ("lost", "w1", cause)
        assert worker.state is LOST


@async_test
async def test_the_liveness_cause_names_a_fractional_interval():
    async with running_pool(interval_s=0.25, liveness=2) as pool:
        await quiet_worker(pool, "w1")
        pool.registry.check_liveness(0, 100.75)
        assert pool.listener.events[-1] == (
            "lost",
            "w1",
            "no message for 0.8 s (liveness 2 x 0.25 s heartbeat interval)",
        )


@async_test
async def test_a_liveness_check_looks_only_at_its_slot():
    async with running_pool(interval_s=1.0, liveness=3) as pool:
        first_peer, first = await quiet_worker(pool, "w1")
        _, second = await quiet_worker(pool, "w2")
        assert (first.slot, second.slot) == (0, 1)
        pool.registry.check_liveness(1, 110.0)
        assert (first.state, second.state) == (WorkerState.IDLE, LOST)
        assert await pool.sent_to(first_peer) == []
        assert pool.count("worker_heartbeats_missed", device_id="0") == 1.0


@async_test
async def test_a_liveness_check_counts_a_missed_heartbeat_past_one_and_a_half_intervals():
    async with running_pool(interval_s=1.0, liveness=3) as pool:
        await quiet_worker(pool, "w1", device_id=4)
        pool.registry.check_liveness(0, 101.5)
        assert pool.count("worker_heartbeats_missed", device_id="4") == 0.0
        pool.registry.check_liveness(0, 101.75)
        assert pool.count("worker_heartbeats_missed", device_id="4") == 1.0
        pool.registry.check_liveness(0, 102.5)
        assert pool.count("worker_heartbeats_missed", device_id="4") == 2.0
        assert pool.registry.ready_count == 1


@async_test
async def test_the_heartbeat_loop_checks_a_slot_once_per_interval():
    async with running_pool(interval_s=0.1, liveness=100) as pool:
        _, worker = await pool.register("w1", device_id=6)
        worker.last_seen = time.monotonic() - 0.2  # each check of its slot counts a missed heartbeat
        loop = asyncio.get_running_loop()
        started = loop.time()
        heartbeats = asyncio.create_task(pool.registry.run_heartbeats())
        await asyncio.sleep(0.25)
        heartbeats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeats
        checks = pool.count("worker_heartbeats_missed", device_id="6")
        assert 1 <= checks <= (loop.time() - started) / 0.1 + 1


@async_test
async def test_the_heartbeat_loop_keeps_a_worker_company_then_drops_it_when_silent():
    async with running_pool(interval_s=0.1, liveness=5) as pool:
        peer, worker = await pool.register("w1")
        heartbeats = asyncio.create_task(pool.registry.run_heartbeats())
        try:
            kind, message = await peer.receive()
            assert (kind, message) == ("heartbeat", pb.Heartbeat())
            while (got := await peer.receive())[0] == "heartbeat":
                pass
        finally:
            heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeats
        kind, message = got
        assert kind == "disconnect"
        assert message.reason.startswith("no message for 0.")
        assert message.reason.endswith(" s (liveness 5 x 0.1 s heartbeat interval)")
        assert worker.state is LOST


def test_a_registry_without_a_listener_says_so():
    transport = Transport("tcp://127.0.0.1:*")
    try:
        registry = WorkerRegistry(transport, 1.0, 3, PoolMetrics())
        with pytest.raises(RuntimeError, match=r"^WorkerRegistry used before set_listener\(\)$"):
            registry.receive(b"fake", "hello", hello("w1"))
    finally:
        transport.close()
