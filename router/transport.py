"""The router's ZeroMQ ROUTER socket: workers' DEALER sockets connect to it.

Each ZeroMQ message from a worker is two frames, [routing id, Envelope]. The receive loop awaits
one message through zmq.asyncio, then drains every message already waiting with non-blocking
reads on a plain twin of the socket (no Future per message), yielding to the event loop every
RECV_BATCH messages so a flood cannot starve the gRPC side. Anything that is not a
well-formed Envelope is logged and dropped; the loop itself never dies of a bad frame.

Sends never wait: a ROUTER socket drops a message to a peer that is gone or whose queue is full,
which the liveness checks then notice. They are rare (Generate, Cancel, heartbeats): the hot path
is worker chunks coming in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio
from google.protobuf.message import Message

from common import wire

log = logging.getLogger(__name__)

RECV_BATCH = 256
# On close, give queued outgoing messages (cancels, disconnects) this long to leave.
CLOSE_LINGER_MS = 200

MessageHandler = Callable[[bytes, str, Message], None]


class Transport:
    def __init__(self, bind: str) -> None:
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        # A restarted worker that reuses its routing id takes the place of its dead predecessor.
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._socket.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        try:
            self._socket.bind(bind)
        except zmq.ZMQError as error:
            self._socket.close(linger=0)
            self._context.term()
            raise OSError(f"cannot bind the worker socket to {bind}: {error}") from error
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._plain = zmq.Socket.shadow(self._socket.underlying)

    def send(self, identity: bytes, message: Message) -> None:
        self.send_frame(identity, wire.pack(message))

    def send_frame(self, identity: bytes, frame: bytes) -> None:
        # Through the asyncio socket, not the plain twin: a send can consume the edge-triggered
        # "readable" signal of a message that just arrived, and zmq.asyncio re-checks for that.
        sent = self._socket.send_multipart((identity, frame), flags=zmq.NOBLOCK)
        if sent.done() and sent.exception() is not None:
            log.warning("could not send to peer %r: %s", identity, sent.exception())

    async def run(self, on_message: MessageHandler) -> None:
        """Receive and dispatch messages until cancelled."""
        while True:
            self._dispatch(await self._socket.recv_multipart(), on_message)
            for _ in range(RECV_BATCH):
                try:
                    parts = self._plain.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._dispatch(parts, on_message)
            else:
                await asyncio.sleep(0)

    def close(self) -> None:
        self._socket.close()
        self._context.term()

    def _dispatch(self, parts: list[bytes], on_message: MessageHandler) -> None:
        if len(parts) != 2:
            log.warning(
                "dropped a message of %d frames from peer %r: expected one Envelope", len(parts) - 1, parts[0]
            )
            return
        identity, frame = parts
        try:
            kind, message = wire.unpack(frame)
        except wire.WireError as error:
            log.warning("dropped a frame from peer %r: %s", identity, error)
            return
        try:
            on_message(identity, kind, message)
        except Exception:
            # A bug in handling one message must not stop the router from serving everyone else.
            log.exception("failed to handle a %s message from peer %r", kind, identity)
