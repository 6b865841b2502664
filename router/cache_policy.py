"""Cache-aware dispatch: which idle worker gets a request, so a conversation's next turn finds its
keys/values still in a worker's KV cache (the worker then prefills only the new tokens).

The router does not tokenize: workers report the conversation prefixes their KV cache holds as
hashes of the turns (common/prefix_hash.py), in their Hello and in the final chunk of every
generation; the policy hashes each request's prefixes the same way. For the request at the head of
the queue it prefers, among the idle workers only:
1. the worker its `x-session-id` last ran on, if that worker has run nothing else since;
2. the idle worker holding the longest prefix of its conversation (the least recently used one
   among equals), as SGLang's cache-aware router does with its radix tree (sgl-router);
3. else nobody: the registry takes its least recently used idle worker, as without the policy.
It never makes a request wait while a worker is idle, and it never reorders the queue: a busy
holder does not hold its conversation back (another idle worker takes it at once and prefills
from 0), and a hot conversation cannot starve the others, which keep their place in the FIFO.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from common.prefix_hash import conversation_hashes
from protos import worker_pb2
from router.metrics import PoolMetrics

if TYPE_CHECKING:
    from router.workers import WorkerRecord

SESSION_ID_KEY = "x-session-id"
MAX_SESSION_ID_CHARS = 128
# Sessions remembered (the worker each last ran on); the oldest are forgotten beyond this.
MAX_SESSIONS = 65536


class Match(enum.Enum):
    SESSION = "session"
    PREFIX = "prefix"
    NONE = "none"


class CachePolicy:
    def __init__(self, metrics: PoolMetrics) -> None:
        self._metrics = metrics
        self._held: dict[bytes, tuple[int, ...]] = {}  # worker identity -> the prefix hashes it holds
        self._holders: dict[int, set[bytes]] = {}  # prefix hash -> identities of the workers holding it
        self._session_worker: OrderedDict[str, bytes] = OrderedDict()  # session -> worker it last ran on
        self._worker_session: dict[bytes, str] = {}  # worker -> session of its last request ("" = none)

    def holds(self, identity: bytes, hashes: Iterable[int]) -> None:
        """A worker reported what its KV cache holds (Hello, final chunk)."""
        self.forget(identity)
        held = tuple(hashes)
        self._held[identity] = held
        for value in held:
            self._holders.setdefault(value, set()).add(identity)

    def forget(self, identity: bytes) -> None:
        """The worker is gone (or about to report anew)."""
        for value in self._held.pop(identity, ()):
            holders = self._holders.get(value)
            if holders is not None:
                holders.discard(identity)
                if not holders:
                    del self._holders[value]

    def choose(
        self, generate: worker_pb2.Generate, idle: Mapping[bytes, WorkerRecord]
    ) -> WorkerRecord | None:
        """The preferred idle worker for this request, or None for the least recently used one.
        `idle` is in least-recently-used order."""
        worker, match = self._preferred(generate, idle)
        self._metrics.on_cache_dispatch(match.value)
        return worker

    def dispatched(self, worker: WorkerRecord, generate: worker_pb2.Generate) -> None:
        """The request now runs on `worker`: its session (if any) is pinned there."""
        session = generate.session_id
        self._worker_session[worker.identity] = session
        if session:
            self._session_worker[session] = worker.identity
            self._session_worker.move_to_end(session)
            while len(self._session_worker) > MAX_SESSIONS:
                self._session_worker.popitem(last=False)

    def _preferred(
        self, generate: worker_pb2.Generate, idle: Mapping[bytes, WorkerRecord]
    ) -> tuple[WorkerRecord | None, Match]:
        session = generate.session_id
        if session:
            identity = self._session_worker.get(session)
            if identity in idle and self._worker_session.get(identity) == session:
                return idle[identity], Match.SESSION
        if generate.HasField("raw_prompt"):
            return None, Match.NONE  # no conversation to match (the HTTP front's /v1/completions)
        for value in reversed(conversation_hashes(generate.system_message, generate.history)):
            holders = self._holders.get(value)
            if holders and any(identity in idle for identity in holders):
                return next(idle[identity] for identity in idle if identity in holders), Match.PREFIX
        return None, Match.NONE


def session_id(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str, str]:
    """(the client's x-session-id or "", "") or, when it is unusable, ("", the problem). Takes gRPC
    metadata or HTTP headers (`headers.items()`: the name is matched in any case)."""
    sent = next((value for key, value in metadata if key.lower() == SESSION_ID_KEY), None)
    if sent is None:
        return "", ""
    if isinstance(sent, str) and 0 < len(sent) <= MAX_SESSION_ID_CHARS and sent.isprintable():
        return sent, ""
    return "", (
        f"the {SESSION_ID_KEY} metadata must be 1 to {MAX_SESSION_ID_CHARS} printable characters, "
        f"got {len(sent)} characters"
    )
