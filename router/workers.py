"""The worker registry: who is connected, what state each worker is in, and whether it is alive.

Registration: a worker's first message is a Hello. A Hello with another protocol version is
refused with a Disconnect. A Hello for a worker id (or a ZeroMQ peer) that is already registered
means the worker restarted or reconnected: the old registration is dropped as lost first. A peer
that is not registered and sends anything but a Hello gets a Disconnect, so a worker the router
dropped, or one talking to a restarted router, registers again at once.

Liveness (Paranoid Pirate): every registered worker is checked once per heartbeat interval, and
every message from a worker counts as a sign of life. A worker silent for `liveness` intervals is
dropped as lost and told so with a Disconnect, in case it was only hung. A live one gets a
Heartbeat, unless the router sent it something else within the last half interval (any message
proves the router alive; the half keeps the worker's longest wait for one under 1.5 intervals).
The checks are spread over the interval: it is cut into HEARTBEAT_SLOTS ticks and each worker has
its own slot (the emptiest one when it registers), so a large pool costs a few sends per tick
instead of one burst per interval that would hold up every stream on the event loop.

Idle workers are kept in least-recently-used order: the one idle the longest gets the next job,
which spreads load and heat evenly over the devices, unless the cache policy (router/cache_policy.py,
router.cache_aware) prefers the idle worker whose KV cache holds the request's conversation.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from google.protobuf.message import Message

from common import wire
from common.devices import DeviceGroupError, format_group, parse_group
from protos import worker_pb2
from router.metrics import PoolMetrics
from router.transport import Transport

if TYPE_CHECKING:
    from router.cache_policy import CachePolicy

log = logging.getLogger(__name__)

# Lost workers are remembered (for the snapshot and metrics) until they, or a worker taking their
# place, register (see _forget_replaced); a bound keeps a peer that registers under ever new ids
# from growing the table without end.
MAX_LOST_RECORDS = 1024
# Unregistered peers remembered for rate-limiting the Disconnects they get: a peer flooding the port
# gets one answer (and one log line) per heartbeat interval, not one per message.
MAX_REFUSED_PEERS = 1024
# Liveness checks and heartbeats: the interval is cut into this many ticks, one slot of workers each.
HEARTBEAT_SLOTS = 20


class WorkerState(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    LOST = "lost"


@dataclass(eq=False, slots=True)
class WorkerRecord:
    identity: bytes  # ZeroMQ routing id of the worker's DEALER socket
    worker_id: str
    device_id: str  # the worker's device group, "0" or "0,1" (common/devices.py)
    model_id: str
    context_size: int
    pid: int
    state: WorkerState
    last_seen: float  # time.monotonic() of its last message
    last_sent: float  # time.monotonic() of the router's last message to it
    slot: int = 0  # which tick of the heartbeat interval checks it
    host: str = ""  # the worker's hostname, as its Hello says
    registered_at: float = 0.0  # time.monotonic() of its registration
    restarts: int = 0  # restarts of its supervisor slot before this process, as its first Hello says
    requests_served: int = 0  # generations it finished (any outcome)
    tokens_served: int = 0
    retiring: bool = False  # told to leave: finishes its request, gets no new one, then says goodbye

    @property
    def device_key(self) -> str:
        """The device as the admin API names it (a string: a device group is "0,1")."""
        return str(self.device_id)


class RegistryListener(Protocol):
    """What the registry tells the scheduler."""

    def worker_ready(self, worker: WorkerRecord) -> None: ...

    def worker_lost(self, worker: WorkerRecord, cause: str) -> None: ...

    def chunk(self, worker: WorkerRecord, chunk: worker_pb2.Chunk) -> None: ...


class WorkerRegistry:
    def __init__(
        self,
        transport: Transport,
        heartbeat_interval_s: float,
        liveness: int,
        metrics: PoolMetrics,
        cache_policy: CachePolicy | None = None,
    ) -> None:
        self._transport = transport
        self._cache_policy = cache_policy
        self._metrics = metrics
        self._interval_s = heartbeat_interval_s
        self._liveness = liveness
        self._listener: RegistryListener | None = None
        self._by_identity: dict[bytes, WorkerRecord] = {}
        self._by_worker_id: dict[str, WorkerRecord] = {}
        self._idle: OrderedDict[bytes, WorkerRecord] = OrderedDict()  # least recently used first
        self._cordoned: set[str] = set()  # device keys whose workers get no new work
        self._lost: OrderedDict[str, WorkerRecord] = OrderedDict()
        self._refused_at: OrderedDict[bytes, float] = OrderedDict()  # peer identity -> last Disconnect
        self._slots: list[dict[bytes, WorkerRecord]] = [{} for _ in range(HEARTBEAT_SLOTS)]
        self._heartbeat_frame = wire.pack(worker_pb2.Heartbeat())
        self._welcome = worker_pb2.Welcome(
            heartbeat_interval_ms=round(heartbeat_interval_s * 1000), liveness=liveness
        )
        self.changed = asyncio.Event()  # set whenever a worker registers or is lost

    @property
    def silence_limit_s(self) -> float:
        """How long a worker may stay silent (or take to confirm a cancel) before it is lost."""
        return self._interval_s * self._liveness

    def set_listener(self, listener: RegistryListener) -> None:
        self._listener = listener

    # -- counts ---------------------------------------------------------------------------------

    @property
    def ready_count(self) -> int:
        return len(self._by_identity)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def lost_count(self) -> int:
        return len(self._lost)

    def workers(self) -> list[WorkerRecord]:
        """Registered workers, then the lost ones still remembered."""
        return [*self._by_identity.values(), *self._lost.values()]

    # -- state changes driven by the scheduler ---------------------------------------------------

    def take_idle(
        self, model: str | None = None, generate: worker_pb2.Generate | None = None
    ) -> WorkerRecord | None:
        """The idle worker of `model` (None: of any model) for `generate`: the cache policy's choice,
        else the least recently used one; now marked busy. None if there is none. Only dispatchable
        workers are in the idle list (not cordoned, not retiring)."""
        idle: Mapping[bytes, WorkerRecord] = self._idle
        if model is not None:
            idle = {identity: worker for identity, worker in idle.items() if worker.model_id == model}
        if not idle:
            return None
        policy = self._cache_policy
        preferred = None if policy is None or generate is None else policy.choose(generate, idle)
        worker = preferred or next(iter(idle.values()))
        del self._idle[worker.identity]
        if policy is not None and generate is not None:
            policy.dispatched(worker, generate)
        worker.state = WorkerState.BUSY
        return worker

    def release(self, worker: WorkerRecord) -> None:
        """A busy worker finished its job: it becomes the most recently used idle worker."""
        if worker.state is WorkerState.BUSY:
            worker.state = WorkerState.IDLE
            if self._dispatchable(worker):
                self._idle[worker.identity] = worker

    # -- operators' changes (router/operations.py) ------------------------------------------------

    def is_cordoned(self, device: str) -> bool:
        return device in self._cordoned

    def cordon(self, device: str) -> None:
        """No new work for the device's workers (present and future) from now on; running requests go on."""
        self._cordoned.add(device)
        for worker in list(self._idle.values()):
            if worker.device_key == device:
                del self._idle[worker.identity]

    def uncordon(self, device: str) -> None:
        self._cordoned.discard(device)
        freed = [
            worker
            for worker in self._by_identity.values()
            if worker.device_key == device and worker.state is WorkerState.IDLE and self._dispatchable(worker)
        ]
        for worker in freed:
            self._idle[worker.identity] = worker
            self._require_listener().worker_ready(worker)

    def retire(self, worker: WorkerRecord) -> None:
        """Tell a worker to leave the pool: it gets no new work from now on, finishes the request it is
        running, then says goodbye (a Disconnect) and exits, and its supervisor does not restart it."""
        if worker.retiring or self._by_identity.get(worker.identity) is not worker:
            return
        worker.retiring = True
        self._idle.pop(worker.identity, None)
        log.info("worker %s (device %s): retiring", worker.worker_id, worker.device_key)
        self.send(worker, worker_pb2.Retire(reason="its device was scaled down, drained or reloaded"))

    def _dispatchable(self, worker: WorkerRecord) -> bool:
        return not worker.retiring and worker.device_key not in self._cordoned

    def drop(self, worker: WorkerRecord, cause: str, *, tell_peer: bool = True) -> None:
        """Forget a registered worker as lost and let the scheduler recover its job.

        The peer is told with a Disconnect (so a worker that was only hung registers again),
        except when it is the one re-registering: that would make it start over once more.
        """
        if self._by_identity.get(worker.identity) is not worker:
            return
        log.warning("worker %s (device %s) lost: %s", worker.worker_id, worker.device_id, cause)
        del self._by_identity[worker.identity]
        del self._by_worker_id[worker.worker_id]
        del self._slots[worker.slot][worker.identity]
        self._idle.pop(worker.identity, None)
        self._forget_cache(worker)
        worker.state = WorkerState.LOST
        self._remember_lost(worker)
        self._metrics.on_worker_lost(worker)
        if tell_peer:
            self._transport.send(worker.identity, worker_pb2.Disconnect(reason=cause))
        self.changed.set()
        self._require_listener().worker_lost(worker, cause)

    def send(self, worker: WorkerRecord, message: Message) -> None:
        worker.last_sent = time.monotonic()
        self._transport.send(worker.identity, message)

    # -- messages from peers ---------------------------------------------------------------------

    def receive(self, identity: bytes, kind: str, message: Message) -> None:
        """Handle one message from a peer on the ZeroMQ socket (the transport's callback)."""
        if kind == "hello":
            self._hello(identity, message)
            return
        worker = self._by_identity.get(identity)
        if worker is None:
            self._refuse_unregistered(identity, kind)
            return
        worker.last_seen = time.monotonic()
        if kind == "chunk":
            self._note_cache(worker, message)
            self._require_listener().chunk(worker, message)
        elif kind == "disconnect" and worker.retiring:
            self._leave(worker)
        elif kind == "disconnect":
            self.drop(worker, f"it disconnected: {message.reason or 'no reason given'}")
        elif kind != "heartbeat":
            log.warning(
                "dropped a %s message from worker %s: workers do not send those", kind, worker.worker_id
            )

    def _hello(self, identity: bytes, hello: worker_pb2.Hello) -> None:
        refusal = _refusal(hello)
        previous = self._by_identity.get(identity)
        if previous is not None:
            self.drop(previous, "it sent a new hello (reconnected or restarted)", tell_peer=False)
        if refusal:
            log.warning("refused a hello from %r: %s", hello.worker_id, refusal)
            self._transport.send(identity, worker_pb2.Disconnect(reason=refusal))
            return
        # A restarted process says so until its first Welcome; a Hello repeated before it arrived must
        # not count twice, so only a worker id this router does not know yet counts as a restart.
        known = hello.worker_id in self._by_worker_id or hello.worker_id in self._lost
        restarted = hello.restarts > 0 and not known
        namesake = self._by_worker_id.get(hello.worker_id)
        if namesake is not None:
            self.drop(
                namesake, "a new process registered with the same worker id (restarted)", tell_peer=False
            )
        self._register(identity, hello, restarted)

    def _register(self, identity: bytes, hello: worker_pb2.Hello, restarted: bool) -> None:
        now = time.monotonic()
        worker = WorkerRecord(
            identity=identity,
            worker_id=hello.worker_id,
            device_id=hello.device_group or str(hello.device_id),
            model_id=hello.model_id,
            context_size=hello.context_size,
            pid=hello.pid,
            state=WorkerState.IDLE,
            last_seen=now,
            last_sent=now,
            slot=min(range(HEARTBEAT_SLOTS), key=lambda slot: len(self._slots[slot])),
            host=hello.host,
            registered_at=now,
            restarts=hello.restarts,
        )
        self._forget_replaced(worker)
        self._by_identity[identity] = worker
        self._by_worker_id[worker.worker_id] = worker
        self._slots[worker.slot][identity] = worker
        if self._dispatchable(worker):
            self._idle[identity] = worker
        if self._cache_policy is not None:
            self._cache_policy.holds(identity, hello.held_prefix)
        self._transport.send(identity, self._welcome)
        log.info(
            "worker %s registered: device %s, model %s, context %d, pid %d%s",
            worker.worker_id,
            worker.device_id,
            worker.model_id,
            worker.context_size,
            worker.pid,
            f" (restart {hello.restarts} of its slot)" if restarted else "",
        )
        self._metrics.on_worker_registered(worker, restarted)
        self.changed.set()
        self._require_listener().worker_ready(worker)

    def _leave(self, worker: WorkerRecord) -> None:
        """A retiring worker said goodbye: forget it (it is gone by design, not lost)."""
        log.info("worker %s (device %s) retired: it left the pool", worker.worker_id, worker.device_key)
        del self._by_identity[worker.identity]
        del self._by_worker_id[worker.worker_id]
        del self._slots[worker.slot][worker.identity]
        self._idle.pop(worker.identity, None)
        self._forget_cache(worker)
        self.changed.set()
        self._require_listener().worker_lost(worker, "it retired")

    def _forget_cache(self, worker: WorkerRecord) -> None:
        """What a worker that left held is of no use to anyone: drop it from the cache policy's tables."""
        if self._cache_policy is not None:
            self._cache_policy.forget(worker.identity)

    def _note_cache(self, worker: WorkerRecord, chunk: worker_pb2.Chunk) -> None:
        """A final chunk says what the worker's KV cache holds now."""
        final = chunk.finish_reason != worker_pb2.FINISH_NONE or chunk.error_kind != worker_pb2.ERROR_NONE
        if final and self._cache_policy is not None:
            self._cache_policy.holds(worker.identity, chunk.held_prefix)

    def _refuse_unregistered(self, identity: bytes, kind: str) -> None:
        if kind == "disconnect":
            return  # it is leaving anyway; answering would only start a ping-pong
        now = time.monotonic()
        if now - self._refused_at.get(identity, -self._interval_s) < self._interval_s:
            return
        self._refused_at[identity] = now
        self._refused_at.move_to_end(identity)
        while len(self._refused_at) > MAX_REFUSED_PEERS:
            self._refused_at.popitem(last=False)
        log.info("a %s from an unregistered peer: told it to register again", kind)
        self._transport.send(identity, worker_pb2.Disconnect(reason="not registered: send a hello"))

    def _forget_replaced(self, worker: WorkerRecord) -> None:
        """Forget the lost worker a new registration takes the place of: the one with the same id,
        else the lost one on the same device whose id is most like the new one's (a restarted
        worker's default id differs only in its pid), so a worker that is gone leaves no trace."""
        if self._lost.pop(worker.worker_id, None) is not None:
            return
        same_device = [lost for lost in self._lost.values() if lost.device_id == worker.device_id]
        if same_device:
            replaced = max(same_device, key=lambda lost: _shared_prefix(lost.worker_id, worker.worker_id))
            del self._lost[replaced.worker_id]

    def _remember_lost(self, worker: WorkerRecord) -> None:
        self._lost[worker.worker_id] = worker
        self._lost.move_to_end(worker.worker_id)
        while len(self._lost) > MAX_LOST_RECORDS:
            self._lost.popitem(last=False)

    def _require_listener(self) -> RegistryListener:
        if self._listener is None:
            raise RuntimeError("WorkerRegistry used before set_listener()")
        return self._listener

    # -- heartbeats ------------------------------------------------------------------------------

    async def run_heartbeats(self) -> None:
        """Check one slot of workers per tick (HEARTBEAT_SLOTS ticks per interval) until cancelled."""
        loop = asyncio.get_running_loop()
        tick_s = self._interval_s / HEARTBEAT_SLOTS
        due = loop.time()
        for slot in itertools.cycle(range(HEARTBEAT_SLOTS)):
            due = max(due + tick_s, loop.time())  # after a stall, go on from now: no burst of ticks
            await asyncio.sleep(due - loop.time())
            self.check_liveness(slot, time.monotonic())

    def check_liveness(self, slot: int, now: float) -> None:
        """Drop the silent workers of one slot; heartbeat the others that need one."""
        quiet_s = self._interval_s / 2
        for worker in list(self._slots[slot].values()):
            silence = now - worker.last_seen
            self._metrics.on_liveness_check(worker, silence, self._interval_s)
            if silence > self.silence_limit_s:
                self.drop(
                    worker,
                    f"no message for {silence:.1f} s "
                    f"(liveness {self._liveness} x {self._interval_s:g} s heartbeat interval)",
                )
            elif now - worker.last_sent >= quiet_s:
                worker.last_sent = now
                self._transport.send_frame(worker.identity, self._heartbeat_frame)


def _shared_prefix(first: str, second: str) -> int:
    """How many leading characters the two strings have in common."""
    return next(
        (index for index, (a, b) in enumerate(zip(first, second, strict=False)) if a != b),
        min(len(first), len(second)),
    )


def _refusal(hello: worker_pb2.Hello) -> str:
    """Why a hello cannot be accepted, or "" if it can."""
    if hello.protocol_version != wire.PROTOCOL_VERSION:
        return (
            f"protocol version {hello.protocol_version} is not supported: "
            f"this router speaks version {wire.PROTOCOL_VERSION}"
        )
    if not hello.worker_id:
        return "hello without a worker_id"
    if hello.device_group:
        try:
            if format_group(parse_group(hello.device_group)) != hello.device_group:
                return f"device_group {hello.device_group!r} is not written as sorted ids such as '0,1'"
        except DeviceGroupError as error:
            return f"device_group: {error}"
    return ""
