"""Host agents: the supervisors that registered with the router, and the commands sent to them.

A supervisor owns the worker processes of its host; the router owns scheduling. So that one
operator command to the router reaches whichever host owns a device, each supervisor registers
as a host agent over the router's ZeroMQ socket (the one its workers use): an AgentHello, then
an AgentState whenever its devices or processes change. Liveness works as for workers (every
message counts; a heartbeat each interval; silent for `liveness` intervals = lost).

Commands (AgentCommand: set the workers of a device, reload the config) are answered by an
AgentReply with the same id. A scale-down is a conversation: the agent asks the router to retire
N workers of a device (RetireWorkers); the router picks them (idle ones first: a busy one would
hold the scale-down until its request ends), marks them retiring so they get no new work, tells
each to leave (Retire) and answers the agent with their pids (Retiring), so the agent does not
restart them when they exit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

from google.protobuf.message import Message

from common import wire
from protos import worker_pb2
from router.transport import Transport
from router.workers import WorkerRecord, WorkerRegistry, WorkerState

log = logging.getLogger(__name__)

AGENT_KINDS = frozenset({"agent_hello", "agent_state", "agent_reply", "retire_workers"})


class AgentUnavailable(Exception):
    """The agent did not answer a command in time, or was lost while it ran."""


@dataclass(eq=False)
class AgentRecord:
    identity: bytes
    agent_id: str
    host: str
    pid: int
    registered_at: float
    last_seen: float
    last_sent: float
    devices: dict[str, worker_pb2.DeviceTarget] = field(default_factory=dict)  # by device id
    processes: list[worker_pb2.AgentWorker] = field(default_factory=list)
    lost: bool = False

    def runs(self, worker: WorkerRecord) -> bool:
        """Whether this agent started the worker (its host and one of its pids)."""
        return worker.host == self.host and any(process.pid == worker.pid for process in self.processes)


class AgentRegistry:
    def __init__(
        self, transport: Transport, workers: WorkerRegistry, heartbeat_interval_s: float, liveness: int
    ) -> None:
        self._transport = transport
        self._workers = workers
        self._interval_s = heartbeat_interval_s
        self._liveness = liveness
        self._by_identity: dict[bytes, AgentRecord] = {}
        self._lost: dict[str, AgentRecord] = {}  # by agent id, until it registers again
        self._replies: dict[int, asyncio.Future[worker_pb2.AgentReply]] = {}
        self._command_ids = itertools.count(1)
        self._welcome = worker_pb2.Welcome(
            heartbeat_interval_ms=round(heartbeat_interval_s * 1000), liveness=liveness
        )

    # -- what operations read -------------------------------------------------------------------

    def agents(self) -> list[AgentRecord]:
        """Connected agents, then the lost ones."""
        return [*self._by_identity.values(), *self._lost.values()]

    def owner_of(self, device: str) -> AgentRecord | None:
        """The connected agent whose host runs this device."""
        return next((agent for agent in self._by_identity.values() if device in agent.devices), None)

    def agent_of(self, worker: WorkerRecord) -> AgentRecord | None:
        return next((agent for agent in self._by_identity.values() if agent.runs(worker)), None)

    async def command(
        self, agent: AgentRecord, command: worker_pb2.AgentCommand, timeout_s: float
    ) -> worker_pb2.AgentReply:
        """Send a command and wait for its reply; AgentUnavailable if none comes in time."""
        command.command_id = next(self._command_ids)
        reply: asyncio.Future[worker_pb2.AgentReply] = asyncio.get_running_loop().create_future()
        self._replies[command.command_id] = reply
        self._send(agent, command)
        try:
            return await asyncio.wait_for(reply, timeout_s)
        except TimeoutError:
            raise AgentUnavailable(
                f"host agent {agent.agent_id} did not answer within {timeout_s:g} s"
            ) from None
        finally:
            self._replies.pop(command.command_id, None)

    # -- messages from peers (server.py routes agent traffic here) -------------------------------

    def handles(self, identity: bytes, kind: str) -> bool:
        return kind in AGENT_KINDS or identity in self._by_identity

    def receive(self, identity: bytes, kind: str, message: Message) -> None:
        if kind == "agent_hello":
            self._hello(identity, message)
            return
        agent = self._by_identity.get(identity)
        if agent is None:
            self._transport.send(identity, worker_pb2.Disconnect(reason="not registered: send a hello"))
            return
        agent.last_seen = time.monotonic()
        if kind == "agent_state":
            agent.devices = {target.device_id: target for target in message.devices}
            agent.processes = list(message.workers)
        elif kind == "agent_reply":
            waiter = self._replies.get(message.command_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
        elif kind == "retire_workers":
            self._retire(agent, message)
        elif kind == "disconnect":
            self._drop(agent, f"it disconnected: {message.reason or 'no reason given'}", tell_peer=False)
        elif kind != "heartbeat":
            log.warning(
                "dropped a %s message from host agent %s: agents do not send those", kind, agent.agent_id
            )

    def _hello(self, identity: bytes, hello: worker_pb2.AgentHello) -> None:
        previous = self._by_identity.get(identity)
        if previous is not None:
            self._drop(previous, "it sent a new hello (reconnected)", tell_peer=False)
        if hello.protocol_version != wire.PROTOCOL_VERSION:
            reason = (
                f"protocol version {hello.protocol_version} is not supported: "
                f"this router speaks version {wire.PROTOCOL_VERSION}"
            )
            log.warning("refused host agent %r: %s", hello.agent_id, reason)
            self._transport.send(identity, worker_pb2.Disconnect(reason=reason))
            return
        now = time.monotonic()
        agent = AgentRecord(identity, hello.agent_id, hello.host, hello.pid, now, now, now)
        self._lost.pop(agent.agent_id, None)
        self._by_identity[identity] = agent
        self._send(agent, self._welcome)
        log.info("host agent %s registered: host %s, pid %d", agent.agent_id, agent.host, agent.pid)

    def _retire(self, agent: AgentRecord, request: worker_pb2.RetireWorkers) -> None:
        """Pick `count` of the agent's workers on the device, idle ones first, and tell them to leave."""
        candidates = [
            worker
            for worker in self._workers.workers()
            if worker.device_key == request.device_id
            and worker.state is not WorkerState.LOST
            and not worker.retiring
            and agent.runs(worker)
        ]
        chosen = idle_first(candidates)[: request.count]
        for worker in chosen:
            self._workers.retire(worker)
        self._send(agent, worker_pb2.Retiring(device_id=request.device_id, pids=[w.pid for w in chosen]))

    def _drop(self, agent: AgentRecord, cause: str, *, tell_peer: bool = True) -> None:
        if self._by_identity.pop(agent.identity, None) is None:
            return
        log.warning("host agent %s lost: %s", agent.agent_id, cause)
        agent.lost = True
        self._lost[agent.agent_id] = agent
        if tell_peer:
            self._transport.send(agent.identity, worker_pb2.Disconnect(reason=cause))

    def _send(self, agent: AgentRecord, message: Message) -> None:
        agent.last_sent = time.monotonic()
        self._transport.send(agent.identity, message)

    # -- liveness --------------------------------------------------------------------------------

    async def run_heartbeats(self) -> None:
        """Once per interval: drop silent agents, heartbeat the others that need one."""
        silence_limit_s = self._interval_s * self._liveness
        heartbeat = worker_pb2.Heartbeat()
        while True:
            await asyncio.sleep(self._interval_s)
            now = time.monotonic()
            for agent in list(self._by_identity.values()):
                silence = now - agent.last_seen
                if silence > silence_limit_s:
                    self._drop(agent, f"no message for {silence:.1f} s")
                elif now - agent.last_sent >= self._interval_s / 2:
                    self._send(agent, heartbeat)


def idle_first(workers: list[WorkerRecord]) -> list[WorkerRecord]:
    """The order in which workers are retired: idle ones first, as a busy one holds its exit until its
    request is done."""
    return sorted(workers, key=lambda worker: worker.state is not WorkerState.IDLE)
