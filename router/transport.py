"""The router's ZeroMQ ROUTER socket: workers' DEALER sockets connect to it.

Each ZeroMQ message from a worker is two frames, [routing id, Envelope]. The socket is a plain
(blocking-API) pyzmq socket watched by the event loop through its file descriptor
(`loop.add_reader(zmq.FD)`), with no zmq.asyncio Future per message. ZeroMQ's FD is
edge-triggered: it signals that the socket's state changed, not that a message waits, and any
operation on the socket (a send too) may consume that signal. So every time the FD fires, and after
every send made outside a drain, the socket is drained with non-blocking receives until EAGAIN;
after RECV_BATCH messages the drain yields to the event loop (and continues at its next turn) so a
flood cannot starve the gRPC side. Anything that is not a well-formed Envelope is logged and
dropped; the drain itself never dies of a bad frame.

Sends never wait: a ROUTER socket drops a message to a peer that is gone or whose queue is full,
which the liveness checks then notice. They are rare (Generate, Cancel, heartbeats): the hot path
is worker chunks coming in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq
from google.protobuf.message import Message

from common import wire
from common.config import CurveConfig
from common.security import CurveServer, RefusalCounter

log = logging.getLogger(__name__)

RECV_BATCH = 256
# On close, give queued outgoing messages (cancels, disconnects) this long to leave.
CLOSE_LINGER_MS = 200
# Plain ints: pyzmq builds an enum from an option or flag passed as its enum member on every call.
_NOBLOCK = int(zmq.NOBLOCK)
_SEND_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

MessageHandler = Callable[[bytes, str, Message], None]


class Transport:
    def __init__(
        self, bind: str, curve: CurveConfig | None = None, count_refusal: RefusalCounter | None = None
    ) -> None:
        """`curve`: accept only workers whose CURVE key is in its allowlist (see common/security.py);
        `count_refusal` is told of each peer refused."""
        self._context = zmq.Context()
        self.curve = None
        if curve is not None and curve.enabled:
            self.curve = CurveServer(curve, self._context, count_refusal)
        self._socket = self._context.socket(zmq.ROUTER)
        if self.curve is not None:
            self.curve.secure(self._socket)
        self._socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        # A restarted worker that reuses its routing id takes the place of its dead predecessor.
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._socket.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        try:
            self._socket.bind(bind)
        except zmq.ZMQError as error:
            self._socket.close(linger=0)
            self._stop_curve()
            self._context.term()
            raise OSError(f"cannot bind the worker socket to {bind}: {error}") from error
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._on_message: MessageHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_scheduled = False

    def send(self, identity: bytes, message: Message) -> None:
        self.send_frame(identity, wire.pack(message))

    def send_frame(self, identity: bytes, frame: bytes) -> None:
        socket = self._socket
        try:
            socket.send(identity, _SEND_MORE)
            socket.send(frame, _NOBLOCK)
        except zmq.ZMQError as error:
            log.warning("could not send to peer %r: %s", identity, error)
        # The send may have consumed the edge that announced a message which arrived meanwhile
        # (a drain under way reads until EAGAIN anyway).
        idle = not (self._draining or self._drain_scheduled)
        if idle and self._loop is not None and socket.get(_EVENTS) & _POLLIN:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    async def run(self, on_message: MessageHandler) -> None:
        """Receive and dispatch messages until cancelled."""
        loop = asyncio.get_running_loop()
        descriptor = self._socket.FD
        self._on_message, self._loop = on_message, loop
        loop.add_reader(descriptor, self._drain)
        try:
            self._drain()  # whatever arrived before the reader was registered
            await loop.create_future()  # never resolved: the drains run as reader callbacks
        finally:
            loop.remove_reader(descriptor)
            self._on_message, self._loop = None, None

    def close(self) -> None:
        self._socket.close()
        self._stop_curve()
        self._context.term()

    def _stop_curve(self) -> None:
        if self.curve is not None:
            self.curve.stop()

    def _drain(self) -> None:
        """Receive and dispatch what is waiting, up to RECV_BATCH messages per event-loop turn."""
        self._drain_scheduled = False
        on_message = self._on_message
        if on_message is None:
            return  # a drain scheduled before run() ended
        recv = self._socket.recv
        self._draining = True
        try:
            for _ in range(RECV_BATCH):
                try:
                    identity = recv(_NOBLOCK)
                    envelope = recv(_NOBLOCK, copy=False)
                except zmq.Again:
                    return
                if envelope.more:
                    self._drop_extra_frames(identity)
                else:
                    _dispatch(identity, envelope.bytes, on_message)
        finally:
            self._draining = False
        self._drain_scheduled = True
        self._loop.call_soon(self._drain)  # more may wait: let the gRPC side run first

    def _drop_extra_frames(self, identity: bytes) -> None:
        """Read and drop the rest of a message of several frames (its first one has been read)."""
        frames = 1
        while self._socket.get(zmq.RCVMORE):
            self._socket.recv(_NOBLOCK)
            frames += 1
        log.warning("dropped a message of %d frames from peer %r: expected one Envelope", frames, identity)


def _dispatch(identity: bytes, frame: bytes, on_message: MessageHandler) -> None:
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
