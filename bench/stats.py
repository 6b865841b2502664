"""What one load run measured: per-request records and the figures derived from them.

All timestamps are wall-clock nanoseconds (time.time_ns) so that they compare with the workers'
Completion.create_time on the same host.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

NS_PER_S = 1_000_000_000
PENDING = ""  # status of a request whose call has not ended yet


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Distribution:
    """Summary of a sample; every figure is None when the sample is empty."""

    count: int
    mean: float | None = None
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(count=0)
        return cls(
            count=len(values),
            mean=sum(values) / len(values),
            min=min(values),
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            max=max(values),
        )

    def scaled(self, factor: float) -> Distribution:
        """The same distribution in another unit (e.g. seconds -> milliseconds)."""
        return Distribution(
            self.count, *(None if value is None else value * factor for value in self._figures())
        )

    def _figures(self) -> tuple[float | None, ...]:
        return (self.mean, self.min, self.p50, self.p90, self.p99, self.max)


@dataclass
class RequestRecord:
    """One StreamComplete call as the client saw it, frame by frame."""

    index: int
    sent_ns: int
    recv_ns: list[int] = field(default_factory=list)  # when each frame arrived
    create_ns: list[int] = field(default_factory=list)  # each frame's create_time (worker clock)
    tokens: list[int] = field(default_factory=list)  # each frame's token_usage (cumulative)
    status: str = PENDING  # "OK" or the gRPC status code name ("UNAVAILABLE", "CANCELLED", ...)
    finish_reason: str = ""  # "STOP", "LENGTH", "ERROR"; "" when no frame had finished = true
    worker_id: str = ""
    prompt_tokens: int = 0
    detail: str = ""  # the error details, or the text of a finish_reason ERROR frame

    def ttft_s(self) -> float | None:
        """From sending the request to the first frame that carries a generated token."""
        for recv, tokens in zip(self.recv_ns, self.tokens, strict=True):
            if tokens > 0:
                return (recv - self.sent_ns) / NS_PER_S
        return None

    def inter_token_s(self) -> list[float]:
        """Gaps between token-bearing frames, one sample per token (a frame of k tokens gives k
        samples of gap / k), so that frames coalesced by the router do not hide the token pace."""
        samples: list[float] = []
        previous_recv, previous_tokens = None, 0
        for recv, tokens in zip(self.recv_ns, self.tokens, strict=True):
            if tokens <= previous_tokens:
                continue
            if previous_recv is not None:
                added = tokens - previous_tokens
                samples.extend([(recv - previous_recv) / NS_PER_S / added] * added)
            previous_recv, previous_tokens = recv, tokens
        return samples

    def frame_delays_s(self) -> list[float]:
        """Client receive time minus the frame's create_time: what the router (and the client's own
        gRPC stack) added to each frame. Meaningful only with the workers on the client's host."""
        return [
            (recv - created) / NS_PER_S
            for recv, created in zip(self.recv_ns, self.create_ns, strict=True)
            if created > 0
        ]

    def decode_tokens_per_s(self) -> float | None:
        """The stream's pace after its first token: tokens after the first over the time they took."""
        first: tuple[int, int] | None = None  # (recv_ns, tokens) of the first token-bearing frame
        last: tuple[int, int] | None = None  # ... and of the last frame that added tokens
        for recv, tokens in zip(self.recv_ns, self.tokens, strict=True):
            if tokens > (last[1] if last else 0):
                first = first or (recv, tokens)
                last = (recv, tokens)
        if first is None or last is None or last[0] <= first[0]:
            return None
        return (last[1] - first[1]) / ((last[0] - first[0]) / NS_PER_S)

    def completion_tokens(self) -> int:
        return self.tokens[-1] if self.tokens else 0


@dataclass(frozen=True)
class LoadReport:
    """The figures an operator asks for; latencies in milliseconds, rates per second."""

    requests: int
    by_status: dict[str, int]
    by_finish_reason: dict[str, int]
    wall_s: float
    request_rate: float
    frames: int
    tokens: int
    tokens_per_s_total: float
    ttft_ms: Distribution
    inter_token_ms: Distribution
    frame_delay_ms: Distribution
    stream_tokens_per_s: Distribution

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(records: Iterable[RequestRecord], started_ns: int, ended_ns: int) -> LoadReport:
    """Aggregate the records of a run that lasted from started_ns to ended_ns."""
    records = list(records)
    wall_s = max(ended_ns - started_ns, 1) / NS_PER_S
    tokens = sum(record.completion_tokens() for record in records)
    return LoadReport(
        requests=len(records),
        by_status=_count(record.status or "PENDING" for record in records),
        by_finish_reason=_count(record.finish_reason or "NONE" for record in records),
        wall_s=wall_s,
        request_rate=len(records) / wall_s,
        frames=sum(len(record.recv_ns) for record in records),
        tokens=tokens,
        tokens_per_s_total=tokens / wall_s,
        ttft_ms=Distribution.of(_present(record.ttft_s() for record in records)).scaled(1e3),
        inter_token_ms=Distribution.of(_flatten(record.inter_token_s() for record in records)).scaled(1e3),
        frame_delay_ms=Distribution.of(_flatten(record.frame_delays_s() for record in records)).scaled(1e3),
        stream_tokens_per_s=Distribution.of(_present(record.decode_tokens_per_s() for record in records)),
    )


def _count(names: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(names).items()))


def _present(values: Iterable[float | None]) -> list[float]:
    return [value for value in values if value is not None]


def _flatten(lists: Iterable[list[float]]) -> list[float]:
    return [value for values in lists for value in values]
