"""A steady closed-loop load on a real pool, every stream checked exactly.

SteadyLoad runs `clients` threads; each sends StreamComplete calls one after another, each with a
prompt of its own ("c2 r17 <model-tag>"), to a pool of paced workers with `echo: true`, whose
answer is the prompt's words cycled to `tokens_per_request` words. So every stream's text is known
exactly, and a stream carrying another request's text, a missing or doubled final frame, or any
error status is a failure. Each call is recorded with when it was sent and the worker that served
it, so a test can check where requests went after an operation returned.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc

from protos import inference_pb2, inference_pb2_grpc
from tests.harness import open_channel

CALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Served:
    prompt: str
    sent_at: float  # time.monotonic() before the call
    worker_id: str
    model_id: str
    problem: str  # "" when the stream was complete and exactly right


def expected_text(prompt: str, tokens: int) -> str:
    words = prompt.split()
    return " ".join(words[index % len(words)] for index in range(tokens))


class SteadyLoad:
    def __init__(
        self,
        address: str,
        tokens: int,
        clients: int = 3,
        *,
        model: str | None = None,
        metadata_model: str | None = None,
        tag: str = "load",
    ) -> None:
        """`model`: sent in the request's model field; `metadata_model`: as x-model metadata."""
        self._address = address
        self._tokens = tokens
        self._clients = clients
        self._model = model
        self._metadata = (("x-model", metadata_model),) if metadata_model else ()
        self._tag = tag
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._served: list[Served] = []
        self._threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)
        ]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> list[Served]:
        """Let every client finish its call in flight, then return all calls."""
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_TIMEOUT_S + 5)
        return self.served()

    def served(self) -> list[Served]:
        with self._lock:
            return list(self._served)

    def sent_after(self, moment: float) -> list[Served]:
        return [call for call in self.served() if call.sent_at > moment]

    def problems(self) -> list[str]:
        return [f"{call.prompt}: {call.problem}" for call in self.served() if call.problem]

    def _client(self, number: int) -> None:
        stub = _stub(self._address)
        round_ = 0
        while not self._stop.is_set():
            round_ += 1
            prompt = f"c{number} r{round_} {self._tag}"
            request = inference_pb2.CompletionRequest(
                history=[inference_pb2.ChatMessage(role=1, content=prompt)]
            )
            if self._model is not None:
                request.model = self._model
            sent_at = time.monotonic()
            record = self._call(stub, request, prompt, sent_at)
            with self._lock:
                self._served.append(record)

    def _call(
        self,
        stub: inference_pb2_grpc.InferenceServiceStub,
        request: inference_pb2.CompletionRequest,
        prompt: str,
        sent_at: float,
    ) -> Served:
        try:
            frames = list(stub.StreamComplete(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S))
        except grpc.RpcError as error:
            return Served(prompt, sent_at, "", "", f"{error.code().name}: {error.details()}")
        text = "".join(frame.output_text for frame in frames)
        finals = [index for index, frame in enumerate(frames) if frame.finished]
        problem = ""
        if finals != [len(frames) - 1]:
            problem = f"final frames at {finals} of {len(frames)}"
        elif text != expected_text(prompt, self._tokens):
            problem = f"text {text!r}"
        workers = {frame.worker_id for frame in frames}
        if len(workers) != 1:
            problem = problem or f"served by {workers}"
        last = frames[-1] if frames else inference_pb2.Completion()
        return Served(prompt, sent_at, last.worker_id, last.model_id, problem)


def _stub(address: str) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(open_channel(address))
