"""The supervisor's link to the router as a host agent (router/agents.py is the other end).

One DEALER socket to the router's ZeroMQ endpoint, the one the workers use. It registers with an
AgentHello, reports the host's devices and processes (AgentState) after each registration and
whenever they change, answers the router's commands (AgentCommand -> AgentReply) through a
callback, asks the router to retire workers for a scale-down (RetireWorkers) and hears which ones
it chose (Retiring). Heartbeats both ways, Paranoid Pirate style: a router silent for `liveness`
intervals is presumed gone, and the agent registers again on a fresh socket (as a worker does).

The supervisor's main loop calls poll() instead of sleeping, so a command is handled as soon as it
arrives. All of it runs on that one thread.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

import zmq
from google.protobuf.message import Message

from common import wire
from protos import worker_pb2 as pb

log = logging.getLogger("supervisor")

CommandHandler = Callable[[pb.AgentCommand], pb.AgentReply]
RetiringHandler = Callable[[pb.Retiring], None]


class AgentLink:
    def __init__(
        self,
        endpoint: str,
        heartbeat_interval_s: float,
        liveness: int,
        on_command: CommandHandler,
        on_retiring: RetiringHandler,
    ) -> None:
        self._endpoint = endpoint
        self._interval_s = heartbeat_interval_s
        self._liveness = liveness
        self._on_command = on_command
        self._on_retiring = on_retiring
        self.agent_id = f"{socket.gethostname()}-agent-{os.getpid()}"
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._registered = False
        self._hello_sent_at: float | None = None
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._state: pb.AgentState | None = None
        self._state_sent: pb.AgentState | None = None
        self._open()

    def poll(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for messages from the router, handle them, keep the link alive."""
        assert self._socket is not None
        if self._socket.poll(round(timeout_s * 1000), zmq.POLLIN):
            self._drain()
        self._keep_alive(time.monotonic())

    def report(self, state: pb.AgentState) -> None:
        """The host's devices and processes now; sent when it differs from what the router has."""
        self._state = state
        if self._registered and state != self._state_sent:
            self._send(state)
            self._state_sent = state

    def ask_retire(self, device_id: str, count: int) -> None:
        if self._registered:
            self._send(pb.RetireWorkers(device_id=device_id, count=count))

    def close(self) -> None:
        if self._socket is not None:
            if self._registered:
                self._send(pb.Disconnect(reason="supervisor stopping"))
            self._socket.close(linger=200)
        self._context.term()

    # ---- internals

    def _open(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.ROUTING_ID, self.agent_id.encode())
        self._socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self._endpoint)
        self._registered = False
        self._hello_sent_at = None

    def _keep_alive(self, now: float) -> None:
        silence_limit_s = self._interval_s * self._liveness
        if self._registered:
            if now - self._last_heard > silence_limit_s:
                log.warning(
                    "router silent for %.1f s: registering again as a host agent", now - self._last_heard
                )
                self._open()
            elif now - self._last_sent >= self._interval_s:
                self._send(pb.Heartbeat())
            return
        if self._hello_sent_at is not None and now - self._hello_sent_at > silence_limit_s:
            self._open()  # no Welcome: a fresh socket drops what was queued for a dead connection
        if self._hello_sent_at is None:
            self._send(
                pb.AgentHello(
                    protocol_version=wire.PROTOCOL_VERSION,
                    agent_id=self.agent_id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                )
            )
            self._hello_sent_at = now

    def _drain(self) -> None:
        assert self._socket is not None
        while True:
            try:
                frame = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            try:
                kind, message = wire.unpack(frame)
            except wire.WireError as error:
                log.warning("dropped a bad frame from the router: %s", error)
                continue
            self._handle(kind, message)

    def _handle(self, kind: str, message: Message) -> None:
        if kind == "welcome":
            if not self._registered:
                log.info("registered with the router at %s as host agent %s", self._endpoint, self.agent_id)
            self._registered = True
            self._state_sent = None
            if self._state is not None:
                self.report(self._state)
        elif kind == "disconnect":
            log.warning("the router disconnected this host agent (%s)", message.reason or "no reason given")
            self._registered = False
            if self._hello_sent_at is None or time.monotonic() - self._hello_sent_at > self._interval_s:
                self._hello_sent_at = None  # a new Hello at once, at most one per interval
        elif kind == "agent_command" and self._registered:
            self._send(self._on_command(message))
        elif kind == "retiring":
            self._on_retiring(message)
        elif kind != "heartbeat":
            log.warning("dropped an unexpected %s message from the router", kind)

    def _send(self, message: Message) -> None:
        assert self._socket is not None
        try:
            self._socket.send(wire.pack(message), zmq.NOBLOCK)
            self._last_sent = time.monotonic()
        except zmq.Again:
            log.warning(
                "dropped an outgoing %s: the router is not accepting messages", type(message).__name__
            )
