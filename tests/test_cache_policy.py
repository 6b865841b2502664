"""The cache-aware choice among idle workers (router/cache_policy.py), on its own: longest held
prefix first, least recently used among equals, sessions pinned only while nothing else ran, and
nothing chosen when nothing matches (the registry then takes its least recently used worker)."""

from __future__ import annotations

from collections import OrderedDict

from common.prefix_hash import conversation_hashes
from protos import worker_pb2
from router.cache_policy import CachePolicy, session_id
from router.metrics import PoolMetrics
from router.workers import WorkerRecord, WorkerState

USER, ASSISTANT = 1, 2


def worker(name: str) -> WorkerRecord:
    return WorkerRecord(name.encode(), name, 0, "m", 512, 1, WorkerState.IDLE, 0.0, 0.0)


def generate(*contents: str, system: str = "sys", session: str = "") -> worker_pb2.Generate:
    message = worker_pb2.Generate(system_message=system, session_id=session)
    for index, content in enumerate(contents):
        message.history.add(role=USER if index % 2 == 0 else ASSISTANT, content=content)
    return message


def held(message: worker_pb2.Generate, answer: str) -> list[int]:
    """What a worker reports after serving `message` with `answer`."""
    turns = [*message.history, worker_pb2.Turn(role=ASSISTANT, content=answer)]
    return conversation_hashes(message.system_message, turns)


def idle(*workers: WorkerRecord) -> OrderedDict[bytes, WorkerRecord]:
    return OrderedDict((w.identity, w) for w in workers)


def dispatch_counts(metrics: PoolMetrics) -> dict[str, float]:
    return {
        sample.labels["match"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "bm_pool_cache_dispatches"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def test_the_worker_holding_the_longest_prefix_is_chosen():
    metrics = PoolMetrics()
    policy = CachePolicy(metrics)
    a, b, c = worker("a"), worker("b"), worker("c")
    policy.holds(a.identity, held(generate("q1"), "r1"))  # the first turn of the conversation
    policy.holds(b.identity, held(generate("q1", "r1", "q2"), "r2"))  # its first two turns
    policy.holds(c.identity, held(generate("other"), "x"))  # the same system message only
    turn3 = generate("q1", "r1", "q2", "r2", "q3")
    assert policy.choose(turn3, idle(c, a, b)) is b
    assert policy.choose(turn3, idle(c, a)) is a, "the holder is busy: the next longest"
    assert policy.choose(generate("new", system="another"), idle(c, a, b)) is None
    assert dispatch_counts(metrics) == {"prefix": 2.0, "none": 1.0}


def test_among_equal_holders_the_least_recently_used_wins():
    policy = CachePolicy(PoolMetrics())
    a, b = worker("a"), worker("b")
    for w in (a, b):
        policy.holds(w.identity, held(generate("q1"), "r1"))
    turn2 = generate("q1", "r1", "q2")
    assert policy.choose(turn2, idle(b, a)) is b
    assert policy.choose(turn2, idle(a, b)) is a


def test_a_forgotten_or_emptied_worker_holds_nothing():
    policy = CachePolicy(PoolMetrics())
    a = worker("a")
    policy.holds(a.identity, held(generate("q1"), "r1"))
    policy.forget(a.identity)
    assert policy.choose(generate("q1", "r1", "q2"), idle(a)) is None
    policy.holds(a.identity, held(generate("q1"), "r1"))
    policy.holds(a.identity, [])  # an engine error: the cache was reset
    assert policy.choose(generate("q1", "r1", "q2"), idle(a)) is None


def test_a_session_sticks_to_its_worker_until_that_worker_runs_something_else():
    policy = CachePolicy(PoolMetrics())
    a, b = worker("a"), worker("b")
    first = generate("hello", system="s1", session="chat-7")
    policy.dispatched(a, first)
    later = generate("unrelated text", system="s2", session="chat-7")
    assert policy.choose(later, idle(b, a)) is a
    policy.dispatched(a, generate("someone else"))
    assert policy.choose(later, idle(b, a)) is None


def test_session_ids_are_read_from_the_metadata():
    assert session_id([("x-session-id", "chat-7")]) == ("chat-7", "")
    assert session_id([("X-Session-Id", "chat-8")]) == ("chat-8", ""), "HTTP headers, any case"
    assert session_id([("other", "x")]) == ("", "")
    value, problem = session_id([("x-session-id", "x" * 129)])
    assert value == "" and "x-session-id" in problem and "129 characters" in problem
