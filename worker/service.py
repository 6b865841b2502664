"""The worker process loop: registers with the router over ZeroMQ, serves generations, heartbeats.

One DEALER socket. The engine runs in a GenerationThread, which sends each chunk itself as soon as
it is made: a hand-off to the loop's thread would cost a thread wake-up per token (latency for the
client, CPU for the host). pyzmq sockets are not thread-safe, so every use of the socket, and of
the request state, is under one lock, and the loop sleeps without touching the socket: in an OS
poll on ZeroMQ's file descriptor and a wake-up socket (also the signal wake-up fd), until a
message, a signal, a nudge from the generation thread or its next deadline. ZeroMQ's descriptor is
edge-triggered and any send may consume its edge, so the loop checks for a waiting message before
it sleeps, and the generation thread nudges it when one waits after its send (or when a generation
ends, which a stop or a Hello may wait for).

Paranoid Pirate heartbeating: a heartbeat every interval (at a random phase, each gap a little
shorter at random, so that workers started together do not reach the router in one burst every
interval); a router silent for `liveness` intervals is presumed dead, so the socket is reopened and
the worker registers again (with backoff), abandoning any generation in flight. A Disconnect from
the router means it no longer knows this worker: abandon and register again at once. A worker that
was itself silent long enough for the router to have dropped it (frozen by SIGSTOP, starved of CPU)
does the same before sending anything, so the overdue chunks of its abandoned request never go out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass

import zmq

from common import wire
from common.config import PoolConfig
from common.devices import DeviceGroup, format_group
from common.security import CurveClient, SecurityError, check_worker_link
from protos import worker_pb2 as pb
from worker.core.engine import Engine, load_engine
from worker.generation import GenerationThread, Job
from worker.translate import chat_request, error_chunk

log = logging.getLogger("worker")

EXIT_ENGINE_HUNG = 70  # the supervisor restarts a worker whose engine step never returned
_SHUTDOWN_FLUSH_MS = 1000  # how long a stopping worker tries to deliver its last messages
# Each gap between heartbeats is the interval times a random factor in [1 - this, 1]: never longer
# than the interval the router expects, and never in step with the other workers for long.
_HEARTBEAT_JITTER = 0.1
# Plain ints: pyzmq builds an enum from an option or flag passed as its enum member on every call.
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


@dataclass(frozen=True)
class WorkerIdentity:
    worker_id: str  # the ZeroMQ routing id: unique in the pool
    devices: DeviceGroup  # the chips it drives: (2,), or (0, 1) for a bmodel compiled for two devices
    restarts: int = 0  # how many times the supervisor restarted this slot before this process


def run_worker(config: PoolConfig, identity: WorkerIdentity, endpoint: str) -> int:
    """Load the engine, then serve until SIGTERM/SIGINT; returns the process exit code."""
    try:  # before the engine loads: a key problem is reported at once
        check_worker_link(endpoint, config.security)
        curve = CurveClient(config.security.curve) if config.security.curve.enabled else None
    except SecurityError as error:
        log.error("%s", error)
        return 2
    log.info(
        "loading %s engine for %s on device %s",
        config.model.engine,
        config.model.path,
        format_group(identity.devices),
    )
    try:
        engine = load_engine(config.model, identity.devices)
    except Exception as error:
        log.error("cannot load the %s engine from %s: %s", config.model.engine, config.model.path, error)
        return 1
    log.info("engine ready: model %s, context %d tokens", engine.model_id, engine.context_size)
    return WorkerService(engine, identity, endpoint, config, curve).run()


@dataclass
class _Generation:
    """The request this worker is serving."""

    request_id: str
    cancel: threading.Event
    received_at: float
    last_progress: float
    first_token_at: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    abandoned: bool = False  # the router no longer expects its chunks


class WorkerService:
    def __init__(
        self,
        engine: Engine,
        identity: WorkerIdentity,
        endpoint: str,
        config: PoolConfig,
        curve: CurveClient | None = None,
    ) -> None:
        """`curve`: connect as a CURVE client with this keypair (the router must allow its key)."""
        self._engine = engine
        self._curve = curve
        self._identity = identity
        self._endpoint = endpoint
        self._settings = config.workers
        self._interval = config.router.heartbeat_interval_s  # until the router's Welcome says otherwise
        self._liveness = config.router.liveness
        self._lock = threading.Lock()  # the socket and the request state: the loop and the generation thread
        self._closed = False
        self._zmq = zmq.Context()
        self._poller = select.poll()  # on file descriptors only: it never touches the ZeroMQ socket
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._poller.register(self._wake_reader.fileno(), select.POLLIN)
        self._dealer = self._open_dealer()
        self._generation = GenerationThread(engine, self._deliver)
        self._current: _Generation | None = None
        self._registered = False
        self._ever_registered = False  # a restart is reported until the first Welcome only
        self._hello_due: float | None = 0.0  # when to send the next Hello; None = sent or registered
        self._hello_sent_at: float | None = None
        self._reconnect_delay = config.workers.reconnect_backoff_s
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._next_heartbeat = 0.0
        self._signals: list[int] = []
        self._stopping = False
        self._retiring = False  # told by the router to leave: exit EXIT_RETIRED once idle
        self._finish_by = math.inf  # a stopping worker lets its request run until then, then cancels
        self._exit_code: int | None = None

    # ---- the loop

    def run(self) -> int:
        self._install_signal_handlers()
        self._generation.start()
        log.info("pid %d, connecting to %s", os.getpid(), self._endpoint)
        try:
            while self._exit_code is None:
                self._wait()
                with self._lock:
                    self._check_own_silence(time.monotonic())
                    self._handle_signals()
                    self._drain_router()
                    self._on_clock(time.monotonic())
        finally:
            self._close()
        log.info("stopped")
        return self._exit_code

    def _wait(self) -> None:
        with self._lock:
            if self._router_message_waiting():
                return
            timeout_ms = max(0.0, self._next_deadline() - time.monotonic()) * 1000
        ready = dict(self._poller.poll(math.ceil(timeout_ms)))
        if self._wake_reader.fileno() in ready:
            with contextlib.suppress(BlockingIOError):
                while self._wake_reader.recv(4096):
                    pass

    def _router_message_waiting(self) -> bool:
        """Whether a message from the router can be read now (this also re-arms ZeroMQ's fd)."""
        return bool(self._dealer.get(_EVENTS) & _POLLIN)

    def _wake_loop(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: the loop has wake-ups pending already
            self._wake_writer.send(b"\0")

    def _next_deadline(self) -> float:
        deadlines = [self._finish_by, time.monotonic() + self._interval]
        if self._registered:
            deadlines += [self._next_heartbeat, self._last_heard + self._silence_limit]
        elif self._hello_sent_at is not None:
            deadlines.append(self._hello_sent_at + self._silence_limit)
        elif self._hello_due is not None and self._current is None:
            deadlines.append(self._hello_due)
        if self._current is not None:
            deadlines.append(self._current.last_progress + self._settings.step_timeout_s)
        return min(deadlines)

    @property
    def _silence_limit(self) -> float:
        return self._interval * self._liveness

    def _check_own_silence(self, now: float) -> None:
        if self._overdue(now):
            silent_for = now - self._last_sent
            self._reconnect(now, f"this worker sent nothing for {silent_for:.1f} s (was it stopped?)")

    def _overdue(self, now: float) -> bool:
        """Silent for so long that the router has dropped this worker: it must register again first.
        (The router checks liveness once per interval: one interval past its limit, it has.)"""
        return self._registered and now - self._last_sent > self._silence_limit + self._interval

    def _on_clock(self, now: float) -> None:
        current = self._current
        if current is not None and now - current.last_progress > self._settings.step_timeout_s:
            self._give_up_on_hung_engine(current)
            return
        if self._stopping:
            self._continue_stopping(now)
            if self._exit_code is not None or current is None:
                return
        # Heartbeats go on while a stopping worker finishes its request, or the router would drop it.
        if self._registered:
            if now - self._last_heard > self._silence_limit:
                self._reconnect(now, f"router silent for {now - self._last_heard:.1f} s")
            elif now >= self._next_heartbeat:
                busy = current.request_id if current and not current.abandoned else ""
                self._send(pb.Heartbeat(busy_request_id=busy))
                self._next_heartbeat = now + self._interval * (1 - _HEARTBEAT_JITTER * random.random())
        elif self._hello_sent_at is not None:
            if now - self._hello_sent_at > self._silence_limit:
                self._reconnect(now, f"no Welcome {now - self._hello_sent_at:.1f} s after Hello")
        elif (
            self._hello_due is not None and now >= self._hello_due and current is None and not self._stopping
        ):
            self._send_hello(now)

    # ---- registration

    def _send_hello(self, now: float) -> None:
        self._send(
            pb.Hello(
                protocol_version=wire.PROTOCOL_VERSION,
                worker_id=self._identity.worker_id,
                device_id=self._identity.devices[0],
                device_group=format_group(self._identity.devices),
                model_id=self._engine.model_id,
                context_size=self._engine.context_size,
                pid=os.getpid(),
                restarts=0 if self._ever_registered else self._identity.restarts,
                host=socket.gethostname(),
                held_prefix=self._engine.held_prefix(),
            )
        )
        self._hello_sent_at = now
        self._hello_due = None

    def _on_welcome(self, welcome: pb.Welcome, now: float) -> None:
        if welcome.heartbeat_interval_ms > 0:
            self._interval = welcome.heartbeat_interval_ms / 1000
        if welcome.liveness > 0:
            self._liveness = welcome.liveness
        if not self._registered:
            log.info(
                "registered with the router (heartbeat %.2f s, liveness %d)", self._interval, self._liveness
            )
        self._registered = self._ever_registered = True
        self._hello_sent_at = None
        self._hello_due = None
        self._reconnect_delay = self._settings.reconnect_backoff_s
        self._next_heartbeat = now + self._interval * random.random()  # this worker's own phase

    def _reconnect(self, now: float, reason: str) -> None:
        """Paranoid Pirate: a fresh socket drops whatever was queued for the dead connection."""
        log.warning("%s; reconnecting to %s in %.2f s", reason, self._endpoint, self._reconnect_delay)
        self._abandon(reason)
        self._poller.unregister(self._dealer_fd)
        self._dealer.close(linger=0)
        self._dealer = self._open_dealer()
        self._registered = False
        self._hello_sent_at = None
        self._hello_due = now + self._reconnect_delay
        self._reconnect_delay = min(self._reconnect_delay * 2, self._settings.reconnect_backoff_max_s)

    def _on_disconnect(self, reason: str, now: float) -> None:
        if not self._registered and self._hello_sent_at is None:
            # A Hello is due already: more Disconnects (the router answers every message of a peer it
            # does not know) must not add Hellos, each of which would restart a fresh registration.
            log.info("a Disconnect while a Hello is due (%s), ignored", reason)
            return
        if self._hello_sent_at is not None:
            # Our Hello refused (e.g. protocol version), or a stale answer to a message sent before
            # it: either way a new Hello, after a backoff, so a refusal cannot make the two spin.
            log.warning(
                "a Disconnect while waiting for the Welcome (%s); a new Hello in %.2f s",
                reason,
                self._reconnect_delay,
            )
            self._hello_sent_at = None
            self._hello_due = now + self._reconnect_delay
            self._reconnect_delay = min(self._reconnect_delay * 2, self._settings.reconnect_backoff_max_s)
            return
        log.warning("the router disconnected this worker (%s); registering again", reason)
        self._abandon("the router disconnected this worker")
        self._registered = False
        self._hello_due = now  # sent as soon as the abandoned generation has stopped

    def _open_dealer(self) -> zmq.Socket:
        dealer = self._zmq.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, self._identity.worker_id.encode())
        dealer.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        dealer.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            self._curve.secure(dealer)
        dealer.connect(self._endpoint)
        self._dealer_fd: int = dealer.get(zmq.FD)
        self._poller.register(self._dealer_fd, select.POLLIN)
        return dealer

    # ---- messages from the router

    def _drain_router(self) -> None:
        while True:
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.monotonic()
            self._last_heard = now
            if len(frames) != 1:
                log.warning("dropped a message of %d frames from the router (expected 1)", len(frames))
                continue
            try:
                kind, message = wire.unpack(frames[0])
            except wire.WireError as error:
                log.warning("dropped a bad frame from the router: %s", error)
                continue
            self._on_message(kind, message, now)

    def _on_message(self, kind: str, message: object, now: float) -> None:
        if kind == "welcome":
            self._on_welcome(message, now)
        elif kind == "generate":
            self._on_generate(message, now)
        elif kind == "cancel":
            self._on_cancel(message)
        elif kind == "retire":
            self._on_retire(message.reason or "no reason given")
        elif kind == "disconnect":
            self._on_disconnect(message.reason or "no reason given", now)
        elif kind != "heartbeat":
            log.warning("dropped an unexpected %s message from the router", kind)

    def _on_generate(self, generate: pb.Generate, now: float) -> None:
        request_id = generate.request_id
        if not request_id:
            log.warning("dropped a Generate without a request id")
        elif self._current is not None:
            busy_with = self._current.request_id
            log.warning("request %s: refused, busy with request %s", request_id, busy_with)
            message = f"worker {self._identity.worker_id} is busy with request {busy_with}"
            self._send(error_chunk(request_id, pb.ERROR_ENGINE, message))
        else:
            cancel = threading.Event()
            self._current = _Generation(request_id, cancel, received_at=now, last_progress=now)
            if generate.HasField("raw_prompt"):
                log.info("request %s: started (raw prompt)", request_id)
            else:
                log.info("request %s: started (%d turns)", request_id, len(generate.history))
            self._generation.submit(Job(request_id, chat_request(generate), cancel))

    def _on_retire(self, reason: str) -> None:
        """Leave the pool for good: the router sends no new work, the request running finishes
        however long it takes (no grace period: nothing is cut), then goodbye and EXIT_RETIRED."""
        if self._retiring:
            return
        log.info("told to retire (%s): leaving once the current request (if any) is done", reason)
        self._retiring = self._stopping = True

    def _on_cancel(self, cancel: pb.Cancel) -> None:
        current = self._current
        if current is not None and current.request_id == cancel.request_id and not current.abandoned:
            log.info("request %s: cancel received", cancel.request_id)
            current.cancel.set()
        else:
            log.info("request %s: cancel for a request not running here, ignored", cancel.request_id)

    # ---- chunks, on the generation thread

    def _deliver(self, chunk: pb.Chunk) -> None:
        """Send a chunk the engine made (called on the generation thread)."""
        with self._lock:
            if self._closed:
                return  # the loop has ended: nobody is listening any more
            now = time.monotonic()
            overdue = self._overdue(now)
            ended = self._on_chunk(chunk, now, overdue)
            if ended or overdue or self._router_message_waiting():
                self._wake_loop()

    def _on_chunk(self, chunk: pb.Chunk, now: float, overdue: bool) -> bool:
        """Send the chunk unless its generation was abandoned or this worker is `overdue` (the router
        has dropped it: the loop abandons the generation as it reconnects); True if it has ended."""
        current = self._current
        if current is None or current.request_id != chunk.request_id:
            log.error("request %s: chunk from the generation thread for no current request", chunk.request_id)
            return False
        current.last_progress = now
        if chunk.completion_tokens > current.completion_tokens and current.first_token_at is None:
            current.first_token_at = now
        current.completion_tokens = chunk.completion_tokens
        current.prompt_tokens = chunk.prompt_tokens
        if not current.abandoned and not overdue:
            self._send(chunk)
        if chunk.finish_reason == pb.FINISH_NONE:
            return False
        self._current = None
        _log_completion(current, chunk, now)
        return True

    def _abandon(self, reason: str) -> None:
        current = self._current
        if current is not None and not current.abandoned:
            log.warning("request %s: abandoned (%s)", current.request_id, reason)
            current.abandoned = True
            current.cancel.set()

    # ---- stopping

    def _install_signal_handlers(self) -> None:
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        signal.set_wakeup_fd(self._wake_writer.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda received, _frame: self._signals.append(received))

    def _handle_signals(self) -> None:
        while self._signals:
            name = signal.Signals(self._signals.pop(0)).name
            if self._finish_by == math.inf:  # the first signal (a retiring worker has no deadline yet)
                self._stopping = True
                self._finish_by = time.monotonic() + self._settings.stop_grace_s / 2
                log.info("%s: stopping once the current request (if any) is done", name)
            elif self._current is not None:
                log.info("%s again: cancelling request %s now", name, self._current.request_id)
                self._current.cancel.set()

    def _continue_stopping(self, now: float) -> None:
        current = self._current
        if current is None:
            self._send(pb.Disconnect(reason="retired" if self._retiring else "worker stopping"))
            self._exit_code = wire.EXIT_RETIRED if self._retiring else 0
        elif now >= self._finish_by and not current.cancel.is_set():
            log.info("request %s: cancelled, the stop grace period is over", current.request_id)
            current.cancel.set()

    def _give_up_on_hung_engine(self, current: _Generation) -> None:
        """A step that never returns cannot be interrupted: report it and let the supervisor restart us."""
        limit = self._settings.step_timeout_s
        log.error(
            "request %s: the engine made no progress for %g s (step_timeout_s); exiting",
            current.request_id,
            limit,
        )
        if not current.abandoned:
            message = f"the engine step did not finish within {limit:g} s (step_timeout_s); worker restarting"
            self._send(
                error_chunk(
                    current.request_id,
                    pb.ERROR_ENGINE,
                    message,
                    current.completion_tokens,
                    current.prompt_tokens,
                )
            )
        self._send(pb.Disconnect(reason="engine hung"))
        self._exit_code = EXIT_ENGINE_HUNG

    def _send(self, message: object) -> None:
        try:
            self._dealer.send(wire.pack(message), _NOBLOCK)
            self._last_sent = time.monotonic()
        except zmq.Again:  # the router is not reading: a heartbeat or chunk it will never miss
            log.warning(
                "dropped an outgoing %s: the router is not accepting messages", type(message).__name__
            )

    def _close(self) -> None:
        signal.set_wakeup_fd(-1)
        # The generation thread holds the lock only while it sends (never inside the engine), so a
        # thread stuck in the engine cannot block the close.
        self._generation.stop(timeout=1.0)
        with self._lock:
            self._closed = True
            self._dealer.close(linger=_SHUTDOWN_FLUSH_MS)
        self._zmq.term()  # delivers the last messages (up to the linger time)
        self._wake_reader.close()
        self._wake_writer.close()


def _log_completion(generation: _Generation, final: pb.Chunk, now: float) -> None:
    outcome = pb.FinishReason.Name(final.finish_reason).removeprefix("FINISH_").lower()
    if final.error_kind != pb.ERROR_NONE:
        kind = pb.ErrorKind.Name(final.error_kind).removeprefix("ERROR_").lower()
        outcome = f"{outcome} ({kind}: {final.error_message})"
    if generation.abandoned:
        outcome += ", abandoned"
    tokens = final.completion_tokens
    first_token = (
        "-"
        if generation.first_token_at is None
        else f"{generation.first_token_at - generation.received_at:.3f} s"
    )
    decode_time = now - (generation.first_token_at or now)
    rate = (tokens - 1) / decode_time if tokens > 1 and decode_time > 0 else 0.0
    log.info(
        "request %s: done, %s; prompt %d tokens, %d tokens, first token after %s, %.1f tokens/s, %.3f s; "
        "%d prompt tokens from the KV cache",
        generation.request_id,
        outcome,
        final.prompt_tokens,
        tokens,
        first_token,
        rate,
        now - generation.received_at,
        final.cached_prompt_tokens,
    )
