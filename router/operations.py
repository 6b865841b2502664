"""What an operator does to a running pool: status, scale, cordon, uncordon, drain, reload.

Transport-neutral (router/admin.py maps it to gRPC). Each operation returns only once it has
taken effect, as seen by the router itself (workers registered or gone, agents' targets set),
or raises OperationError saying why not; each is idempotent (asking for the state the pool is in
already changes nothing and says so).

Who does what: the router decides which worker runs what (cordons, which workers retire: idle
ones first); the host agent of a device (its supervisor, router/agents.py) starts and stops the
processes and checks the CPU core budget. A device is a string id: "0", or "0,1" for a group.

Changes to one device (scale, drain) run one at a time, in the order asked, and a reload waits for
them (and they for it): two operators asking for 3 and for 1 workers both get an answer, each once
its own change took effect, and the device ends as the later one asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from common.config import ConfigError, PoolConfig, load_config, restart_only_changes
from protos import admin_pb2, worker_pb2
from router.agents import AgentRecord, AgentRegistry, AgentUnavailable, idle_first
from router.models import ServedModels
from router.scheduler import Scheduler
from router.workers import WorkerRecord, WorkerRegistry, WorkerState

POLL_S = 0.05  # how often a waiting operation looks at the pool again


class Refusal(enum.Enum):
    NOT_FOUND = "not found"  # unknown device or model
    INVALID = "invalid"  # a bad argument or config file
    REFUSED = "refused"  # cannot be done now (e.g. the CPU core budget); nothing changed
    TIMEOUT = "timeout"  # started, not finished in time


class OperationError(Exception):
    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.message = message


class Operations:
    def __init__(
        self,
        workers: WorkerRegistry,
        scheduler: Scheduler,
        agents: AgentRegistry,
        models: ServedModels,
        config: PoolConfig,
        config_path: Path | None,
    ) -> None:
        self._workers = workers
        self._scheduler = scheduler
        self._agents = agents
        self._models = models
        self._config = config
        self._config_path = config_path
        self._drained: set[str] = set()  # cordoned by a drain: a scale-up brings them back
        self._device_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._reload_lock = asyncio.Lock()

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> admin_pb2.PoolStatus:
        now = time.monotonic()
        status = admin_pb2.PoolStatus(default_model=self._models.default_name or "")
        for agent in self._agents.agents():
            status.agents.add(
                agent_id=agent.agent_id,
                host=agent.host,
                pid=agent.pid,
                state="lost" if agent.lost else "connected",
                uptime_s=now - agent.registered_at,
            )
        for device in self.devices():
            owner = self._agents.owner_of(device)
            target = owner.devices[device] if owner else None
            status.devices.add(
                device_id=device,
                agent_id=owner.agent_id if owner else "",
                model=target.model if target else self._model_on(device),
                target_workers=target.workers if target else len(self._live_on(device)),
                cordoned=self._workers.is_cordoned(device),
            )
        registered = self._workers.workers()
        for worker in registered:
            status.workers.append(self._worker_status(worker, now))
        status.workers.extend(self._starting(registered))
        queued = self._scheduler.queued_by_model()
        for model in self._models.names():
            status.queues.add(
                model=model,
                queued=queued.get(model, 0),
                workers=sum(1 for worker in self._live() if worker.model_id == model),
            )
        if None in queued:
            status.queues.add(model="", queued=queued[None], workers=len(self._live()))
        return status

    def devices(self) -> list[str]:
        """Devices an agent owns, then those with registered workers that no agent owns."""
        known = [device for agent in self._agents.agents() if not agent.lost for device in agent.devices]
        known += sorted({worker.device_key for worker in self._live()} - set(known))
        return known

    def _worker_status(self, worker: WorkerRecord, now: float) -> admin_pb2.WorkerStatus:
        job = self._scheduler.running_on(worker)
        agent = self._agents.agent_of(worker)
        process = next((p for p in agent.processes if p.pid == worker.pid), None) if agent else None
        return admin_pb2.WorkerStatus(
            worker_id=worker.worker_id,
            host=worker.host,
            device_id=worker.device_key,
            model=worker.model_id,
            state=self._state_name(worker),
            pid=worker.pid,
            request_id=job.request_id if job else "",
            requests_served=worker.requests_served,
            tokens_served=worker.tokens_served,
            uptime_s=now - worker.registered_at if worker.state is not WorkerState.LOST else 0.0,
            restarts=process.restarts if process else worker.restarts,
        )

    def _state_name(self, worker: WorkerRecord) -> str:
        if worker.state is WorkerState.LOST:
            return "lost"
        if worker.retiring:
            return "draining"
        if self._workers.is_cordoned(worker.device_key):
            return "cordoned"
        return worker.state.value

    def _starting(self, registered: list[WorkerRecord]) -> list[admin_pb2.WorkerStatus]:
        """Agents' processes not registered (yet): loading their model, or retired and exiting."""
        live = {(worker.host, worker.pid) for worker in registered if worker.state is not WorkerState.LOST}
        return [
            admin_pb2.WorkerStatus(
                host=agent.host,
                device_id=process.device_id,
                model=process.model,
                state="draining" if process.retiring else "starting",
                pid=process.pid,
                restarts=process.restarts,
            )
            for agent in self._agents.agents()
            if not agent.lost
            for process in agent.processes
            if (agent.host, process.pid) not in live
        ]

    # -- cordon ----------------------------------------------------------------------------------

    def cordon(self, device: str) -> str:
        self._require_device(device)
        if self._workers.is_cordoned(device):
            return f"device {device} is already cordoned"
        self._workers.cordon(device)
        running = sum(1 for worker in self._live_on(device) if worker.state is WorkerState.BUSY)
        return f"device {device} cordoned: no new work for its workers; {running} running requests finish"

    def uncordon(self, device: str) -> str:
        self._require_device(device)
        self._drained.discard(device)
        if not self._workers.is_cordoned(device):
            return f"device {device} is not cordoned"
        self._workers.uncordon(device)
        return f"device {device} uncordoned: its workers take new work"

    # -- scale -----------------------------------------------------------------------------------

    async def scale_device(self, device: str, count: int, timeout_s: float) -> str:
        self._require_device(device)
        deadline = time.monotonic() + timeout_s
        async with self._device_locks[device]:
            before = len(self._active_on(device))
            await self._set_workers(device, count, deadline)
            if count > 0 and device in self._drained:
                self._drained.discard(device)
                self._workers.uncordon(device)
            await self._until_settled(lambda: [device], deadline, timeout_s)
        if before == count:
            return f"device {device} already has {count} workers"
        return f"device {device}: {before} -> {count} workers"

    async def scale_model(self, model: str, count: int, timeout_s: float) -> str:
        devices = [
            device
            for agent in self._agents.agents()
            if not agent.lost
            for device, target in agent.devices.items()
            if target.model == model
        ]
        if model not in self._models.names() and not devices:
            raise OperationError(
                Refusal.NOT_FOUND,
                f"unknown model {model!r}; served models: {', '.join(self._models.names()) or 'none'}",
            )
        if not devices:
            raise OperationError(Refusal.REFUSED, f"no host agent runs model {model!r} on any device")
        answers = await asyncio.gather(*(self.scale_device(device, count, timeout_s) for device in devices))
        return "; ".join(answers)

    async def _set_workers(self, device: str, count: int, deadline: float) -> None:
        """Have the device's host agent keep `count` workers there (it asks the router to retire the
        surplus); without an agent, retire the surplus directly."""
        agent = self._agents.owner_of(device)
        if agent is None:
            self._retire_without_agent(device, count)
            return
        model = agent.devices[device].model
        command = worker_pb2.AgentCommand(
            set_workers=worker_pb2.DeviceTarget(device_id=device, model=model, workers=count)
        )
        await self._command(agent, command, deadline)

    def _retire_without_agent(self, device: str, count: int) -> None:
        """Workers started by hand: the router can retire some, nobody can start more."""
        active = self._active_on(device)
        if count > len(active):
            raise OperationError(
                Refusal.REFUSED,
                f"device {device} has no host agent (its workers were started by hand): "
                "only a supervisor can start workers there",
            )
        for worker in idle_first(active)[: len(active) - count]:
            self._workers.retire(worker)

    # -- drain -----------------------------------------------------------------------------------

    async def drain(self, device: str, timeout_s: float) -> AsyncIterator[admin_pb2.DrainProgress]:
        """Cordon the device, then stop its workers once idle; one progress frame per change."""
        self._require_device(device)
        deadline = time.monotonic() + timeout_s
        async with self._device_locks[device]:
            self._workers.cordon(device)
            self._drained.add(device)
            await self._set_workers(device, 0, deadline)
            async for progress in self._drain_progress(device, deadline, timeout_s):
                yield progress

    async def _drain_progress(
        self, device: str, deadline: float, timeout_s: float
    ) -> AsyncIterator[admin_pb2.DrainProgress]:
        """A frame whenever the device's busy or registered workers change, until none is left."""
        last: tuple[int, int] | None = None
        while True:
            left = self._live_on(device)
            busy = sum(1 for worker in left if worker.state is WorkerState.BUSY)
            if (busy, len(left)) != last:
                last = (busy, len(left))
                yield admin_pb2.DrainProgress(
                    device_id=device,
                    busy_workers=busy,
                    workers=len(left),
                    done=not left,
                    message=f"device {device} drained: no workers left"
                    if not left
                    else f"device {device}: {len(left)} workers left, {busy} finishing a request",
                )
            if not left:
                return
            if time.monotonic() > deadline:
                raise OperationError(
                    Refusal.TIMEOUT, f"device {device}: {len(left)} workers still there after {timeout_s:g} s"
                )
            await asyncio.sleep(POLL_S)

    # -- reload ----------------------------------------------------------------------------------

    async def reload(self, timeout_s: float) -> tuple[list[str], list[str]]:
        """Re-read the router's file and have every host agent re-read its own; (changes, not_live)."""
        deadline = time.monotonic() + timeout_s
        async with self._reload_lock, contextlib.AsyncExitStack() as held:
            for device in sorted(self.devices()):
                await held.enter_async_context(self._device_locks[device])
            return await self._reload(deadline, timeout_s)

    async def _reload(self, deadline: float, timeout_s: float) -> tuple[list[str], list[str]]:
        changes, not_live = self.reload_router_config()
        agents = [agent for agent in self._agents.agents() if not agent.lost]
        replies = await asyncio.gather(
            *(
                self._command(agent, worker_pb2.AgentCommand(reload=worker_pb2.ReloadConfig()), deadline)
                for agent in agents
            )
        )
        routers_own = set(not_live)  # an agent on the router's host reads the same file
        for agent, reply in zip(agents, replies, strict=True):
            changes += [f"{agent.agent_id}: {change}" for change in reply.changes]
            not_live += [f"{agent.agent_id}: {item}" for item in reply.not_live if item not in routers_own]
        await self._until_settled(
            lambda: [device for agent in agents for device in agent.devices], deadline, timeout_s
        )
        return changes, not_live

    def reload_router_config(self) -> tuple[list[str], list[str]]:
        """Re-read the router's own file (its models and default; the rest needs a restart)."""
        if self._config_path is None:
            return [], []
        try:
            config = load_config(self._config_path)
        except ConfigError as error:
            raise OperationError(
                Refusal.INVALID, f"config {self._config_path}: {error}; nothing was changed"
            ) from None
        changes = []
        names = [model.name for model in config.served_models]
        if names != [model.name for model in self._config.served_models]:
            changes.append(f"router: models {', '.join(names)} (default {names[0]})")
        self._models.configure(names, listed=bool(config.models))
        not_live = restart_only_changes(self._config, config)
        self._config = config
        return changes, not_live

    # -- shared ----------------------------------------------------------------------------------

    async def _command(
        self, agent: AgentRecord, command: worker_pb2.AgentCommand, deadline: float
    ) -> worker_pb2.AgentReply:
        try:
            reply = await self._agents.command(agent, command, max(deadline - time.monotonic(), 0.1))
        except AgentUnavailable as error:
            raise OperationError(Refusal.TIMEOUT, str(error)) from None
        if reply.error:
            raise OperationError(Refusal.REFUSED, f"host agent {agent.agent_id}: {reply.error}")
        return reply

    def _require_device(self, device: str) -> None:
        known = self.devices()
        if device not in known:
            raise OperationError(
                Refusal.NOT_FOUND, f"unknown device {device!r}; known devices: {', '.join(known) or 'none'}"
            )

    def _live(self) -> list[WorkerRecord]:
        return [worker for worker in self._workers.workers() if worker.state is not WorkerState.LOST]

    def _live_on(self, device: str) -> list[WorkerRecord]:
        return [worker for worker in self._live() if worker.device_key == device]

    def _active_on(self, device: str) -> list[WorkerRecord]:
        return [worker for worker in self._live_on(device) if not worker.retiring]

    def _model_on(self, device: str) -> str:
        return next((worker.model_id for worker in self._live_on(device)), "")

    def _settled(self, device: str) -> bool:
        """The device has exactly its agent's target: that many registered workers of its model, and
        no worker that is leaving or runs another model."""
        agent = self._agents.owner_of(device)
        live = self._live_on(device)
        if agent is None:
            return not any(worker.retiring for worker in live)
        target = agent.devices[device]
        ready = [w for w in live if w.model_id == target.model and not w.retiring]
        return len(ready) == len(live) == target.workers

    def _progress(self, device: str) -> str:
        live = self._live_on(device)
        leaving = sum(1 for worker in live if worker.retiring)
        agent = self._agents.owner_of(device)
        wanted = agent.devices[device].workers if agent and device in agent.devices else "?"
        return f"{len(live) - leaving} of {wanted} workers registered, {leaving} still leaving"

    async def _until_settled(
        self, devices: Callable[[], list[str]], deadline: float, timeout_s: float
    ) -> None:
        """Wait until every device runs what its agent keeps there; else TIMEOUT saying how far it got."""
        while not all(self._settled(device) for device in devices()):
            if time.monotonic() > deadline:
                behind = [f"device {d}: {self._progress(d)}" for d in devices() if not self._settled(d)]
                raise OperationError(Refusal.TIMEOUT, f"not done after {timeout_s:g} s: {'; '.join(behind)}")
            await asyncio.sleep(POLL_S)
