"""Shared pieces of the fault-injection tests (tests/test_fault_*.py).

The pools these tests start run the paced engine with `echo` on: each answer is the words of its
request's last user turn, cycled. Every request gets a unique one-word prompt, so a client can check
that it received exactly its own request's text, and any cross-talk shows. Streams run on threads
and record every frame as it arrives, then how the call ended (OK or a gRPC status).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from protos import inference_pb2 as api
from protos import inference_pb2_grpc
from tests.harness import WAIT_S, ManagedProcess, Pool, ProcessSet, start_pool, wait_until, write_config

USER = 1
# A paced pool fast enough for tests: a 10-token answer takes about 0.1 s.
ECHO_PACE: dict[str, Any] = {
    "echo": True,
    "tokens_per_second": 100.0,
    "first_token_delay_s": 0.02,
    "tokens_per_request": 10,
}


def echo_settings(
    router: dict[str, Any] | None = None,
    workers: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    **paced: Any,
) -> dict[str, Any]:
    """Overrides for tests.harness.write_config: an echoing paced model (with the other `model`
    settings given), plus the sections given."""
    return {
        "model": {**(model or {}), "paced": {**ECHO_PACE, **paced}},
        "router": router or {},
        "workers": workers or {},
    }


def start_echo_pool(procs: ProcessSet, directory: Path, **settings: Any) -> Pool:
    """The whole pool (supervisor, router, workers) of the echoing paced model, serving; `settings`
    as echo_settings takes them."""
    return start_pool(procs, write_config(directory, echo_settings(**settings)))


def unique_prompt(tag: str = "req") -> str:
    """One word that no other request of the test run uses."""
    return f"{tag}-{secrets.token_hex(4)}"


def request(prompt: str, **params: Any) -> api.CompletionRequest:
    return api.CompletionRequest(
        system_message="You are a helpful assistant.",
        history=[api.ChatMessage(role=USER, content=prompt)],
        **params,
    )


def expected_text(prompt: str, tokens: int) -> str:
    """What the echoing paced engine says in `tokens` tokens."""
    return " ".join(itertools.islice(itertools.cycle(prompt.split()), tokens))


@dataclass
class Outcome:
    """One call: the frames received, then how it ended."""

    prompt: str
    frames: list[api.Completion] = field(default_factory=list)
    code: grpc.StatusCode | None = None  # None while running; OK when the stream ended normally
    details: str = ""

    @property
    def text(self) -> str:
        return "".join(frame.output_text for frame in self.frames)

    @property
    def worker_ids(self) -> set[str]:
        return {frame.worker_id for frame in self.frames}

    def describe(self) -> str:
        return f"{self.prompt}: {self.code} {self.details!r}, {len(self.frames)} frames, text {self.text!r}"


def assert_complete(outcome: Outcome, finish: int | None = None) -> None:
    """A normal end: status OK, only the last frame finished, counts growing, exactly its own text."""
    assert outcome.code == grpc.StatusCode.OK, outcome.describe()
    frames = outcome.frames
    assert frames, outcome.describe()
    assert [frame.finished for frame in frames] == [False] * (len(frames) - 1) + [True], outcome.describe()
    usage = [frame.token_usage for frame in frames[:-1]]
    assert usage == sorted(set(usage)), f"token_usage not strictly increasing: {outcome.describe()}"
    last = frames[-1]
    assert last.finish_reason in ((api.STOP, api.LENGTH) if finish is None else (finish,)), outcome.describe()
    assert outcome.text == expected_text(outcome.prompt, last.token_usage), outcome.describe()
    assert len(outcome.worker_ids) == 1, f"one stream served by several workers: {outcome.describe()}"


def assert_failed(outcome: Outcome, code: grpc.StatusCode, *phrases: str) -> None:
    """An explicit failure: the status, a message naming the cause, and only its own text before it."""
    assert outcome.code == code, outcome.describe()
    for phrase in phrases:
        assert phrase in outcome.details, outcome.describe()
    assert not any(frame.finished for frame in outcome.frames), outcome.describe()
    assert expected_text(outcome.prompt, 10_000).startswith(outcome.text), outcome.describe()


class LiveStream:
    """A StreamComplete call consumed on its own thread; the test watches it and may cancel it."""

    def __init__(self, stub: inference_pb2_grpc.InferenceServiceStub, prompt: str, **params: Any) -> None:
        timeout = params.pop("timeout", 4 * WAIT_S)
        self.outcome = Outcome(prompt)
        self._call = stub.StreamComplete(request(prompt, **params), timeout=timeout)
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._consume, name=f"stream {prompt}", daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        outcome = self.outcome
        try:
            for frame in self._call:
                with self._progress:
                    outcome.frames.append(frame)
                    self._progress.notify_all()
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        with self._progress:
            outcome.code, outcome.details = code, details
            self._progress.notify_all()

    def wait_frames(self, count: int, timeout: float = WAIT_S) -> list[api.Completion]:
        """Block until `count` frames arrived (fails if the call ends first or time runs out)."""
        with self._progress:
            arrived = self._progress.wait_for(
                lambda: len(self.outcome.frames) >= count or self.outcome.code is not None, timeout
            )
            assert arrived and len(self.outcome.frames) >= count, (
                f"waiting for {count} frames: {self.outcome.describe()}"
            )
            return list(self.outcome.frames)

    def cancel(self) -> None:
        self._call.cancel()

    def result(self, timeout: float = 4 * WAIT_S) -> Outcome:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), (
            f"the call did not end in {timeout:.0f} s: {self.outcome.describe()}"
        )
        return self.outcome


def run_streams(
    stub: inference_pb2_grpc.InferenceServiceStub, prompts: list[str], **params: Any
) -> list[Outcome]:
    """Run one stream per prompt, all at once; return their outcomes in order."""
    streams = [LiveStream(stub, prompt, **params) for prompt in prompts]
    return [stream.result() for stream in streams]


# ---- the pool's log (router and workers write to the supervisor's output)


def registrations(process: ManagedProcess) -> list[str]:
    """Worker ids in the order the router registered them (repeats included)."""
    return re.findall(r"worker (\S+) registered: device", process.log())


def wait_registered(process: ManagedProcess, worker_id: str, times: int = 1) -> None:
    wait_until(
        lambda: registrations(process).count(worker_id) >= times, f"worker {worker_id} registered x{times}"
    )


def worker_pid(worker_id: str) -> int:
    """The pid a default worker id ends with (HOST-devN-wI-PID)."""
    return int(worker_id.rsplit("-", 1)[1])


def log_lines(process: ManagedProcess, pattern: str) -> Iterator[re.Match[str]]:
    return re.finditer(pattern, process.log())


async def wait_async(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> None:
    """wait_until for a test running on an event loop (e.g. with the router in-process)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)
