"""The load generator: its statistics on known inputs, its argument checks, and one real run against a
router with two paced workers (real processes on loopback)."""

from __future__ import annotations

import asyncio
import math

import pytest

from bench import loadgen
from bench.loadgen import LoadSpec, build_request, load_prompts, run_load, spec_from_args
from bench.pool import PacedPool, PoolSpec
from bench.stats import Distribution, RequestRecord, percentile, summarize
from common.config import PacedConfig

MS = 1_000_000  # ns


def test_percentile_interpolates_between_closest_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7 * (4 - 3)
    assert percentile([7.0], 99) == 7.0


def test_percentile_refuses_empty_input_and_bad_q():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0], 101)


def test_distribution_of_known_sample_and_scaling():
    sample = [float(value) for value in range(1, 101)]  # 1..100
    distribution = Distribution.of(sample)
    assert distribution.count == 100
    assert distribution.mean == pytest.approx(50.5)
    assert distribution.p50 == pytest.approx(50.5)
    assert distribution.p90 == pytest.approx(90.1)
    assert distribution.p99 == pytest.approx(99.01)
    assert (distribution.min, distribution.max) == (1.0, 100.0)
    in_thousands = distribution.scaled(1e-3)
    assert in_thousands.p99 == pytest.approx(0.09901)
    assert in_thousands.count == 100
    assert Distribution.of([]) == Distribution(count=0)
    assert Distribution(count=0).scaled(1e3).p50 is None


def _record(index: int, frames: list[tuple[int, int]], sent_ms: int = 0, lag_ms: int = 1) -> RequestRecord:
    """A record whose frames arrived at the given (ms, cumulative tokens), each made lag_ms earlier."""
    return RequestRecord(
        index=index,
        sent_ns=sent_ms * MS,
        recv_ns=[at * MS for at, _ in frames],
        create_ns=[(at - lag_ms) * MS for at, _ in frames],
        tokens=[tokens for _, tokens in frames],
        status="OK",
        finish_reason="LENGTH",
    )


def test_record_figures_count_coalesced_frames_per_token():
    # Tokens 1, 2 one per frame 100 ms apart; tokens 3 and 4 arrive together 200 ms later; then a
    # final frame without new tokens.
    record = _record(0, [(100, 1), (200, 2), (400, 4), (401, 4)], lag_ms=2)
    assert record.ttft_s() == pytest.approx(0.1)
    assert record.inter_token_s() == pytest.approx([0.1, 0.1, 0.1])
    assert record.decode_tokens_per_s() == pytest.approx(3 / 0.3)
    assert record.frame_delays_s() == pytest.approx([0.002] * 4)
    assert record.completion_tokens() == 4


def test_record_without_tokens_has_no_latency_figures():
    record = RequestRecord(index=0, sent_ns=0, status="UNAVAILABLE")
    assert record.ttft_s() is None
    assert record.inter_token_s() == []
    assert record.decode_tokens_per_s() is None
    assert record.completion_tokens() == 0


def test_summarize_counts_every_request_and_rates_over_the_wall_time():
    fast = _record(0, [(100, 1), (150, 2), (200, 3)])
    slow = _record(1, [(300, 1), (500, 2)], sent_ms=100)
    failed = RequestRecord(index=2, sent_ns=0, status="UNAVAILABLE", detail="worker lost")
    pending = RequestRecord(index=3, sent_ns=0)
    report = summarize([fast, slow, failed, pending], started_ns=0, ended_ns=1000 * MS)
    assert report.requests == 4
    assert report.by_status == {"OK": 2, "PENDING": 1, "UNAVAILABLE": 1}
    assert report.by_finish_reason == {"LENGTH": 2, "NONE": 2}
    assert report.wall_s == pytest.approx(1.0)
    assert report.tokens == 5
    assert report.frames == 5
    assert report.tokens_per_s_total == pytest.approx(5.0)
    assert report.request_rate == pytest.approx(4.0)
    assert report.ttft_ms.count == 2
    assert report.ttft_ms.p50 == pytest.approx(150.0)  # 100 ms and 200 ms
    assert report.inter_token_ms.count == 3
    assert report.inter_token_ms.max == pytest.approx(200.0)
    assert report.frame_delay_ms.p99 == pytest.approx(1.0)
    assert report.stream_tokens_per_s.min == pytest.approx(5.0)  # 1 token in 200 ms
    assert report.stream_tokens_per_s.max == pytest.approx(20.0)  # 2 tokens in 100 ms


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"concurrency": None, "requests": 1}, "exactly one"),
        ({"concurrency": 2, "rate": 1.0, "requests": 1}, "exactly one"),
        ({"concurrency": 0, "requests": 1}, "concurrency must be at least 1"),
        ({"concurrency": None, "rate": -1.0, "requests": 1}, "rate must be a positive"),
        ({"concurrency": 1}, "request count, a duration"),
        ({"concurrency": 1, "requests": 0}, "requests must be at least 1"),
        ({"concurrency": 1, "duration_s": 0.0}, "duration must be positive"),
        ({"concurrency": 1, "requests": 1, "channels": 0}, "channels must be at least 1"),
    ],
)
def test_load_spec_names_what_is_wrong(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        LoadSpec(**kwargs)


def test_command_line_defaults_and_modes():
    closed = spec_from_args(loadgen.parse_args(["--concurrency", "16", "--requests", "200"]))
    assert (closed.concurrency, closed.rate, closed.requests) == (16, None, 200)
    assert spec_from_args(loadgen.parse_args([])).requests == 100  # neither count nor duration given
    timed = spec_from_args(loadgen.parse_args(["--rate", "2.5", "--duration", "30"]))
    assert (timed.concurrency, timed.rate, timed.requests, timed.duration_s) == (None, 2.5, None, 30.0)
    with pytest.raises(SystemExit):
        loadgen.parse_args(["--concurrency", "2", "--rate", "1"])


def test_prompt_file_one_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("你好\n\n  What is 2+2?  \n", encoding="utf-8")
    assert load_prompts(path) == ["你好", "What is 2+2?"]
    assert load_prompts(None) == list(loadgen.BUILTIN_PROMPTS)
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_prompts(tmp_path / "missing.txt")


def test_request_sets_only_the_parameters_given():
    plain = build_request(LoadSpec(requests=1), "hi")
    assert [(turn.role, turn.content) for turn in plain.history] == [(1, "hi")]
    assert not plain.HasField("max_new_tokens")
    assert not plain.HasField("temperature")
    greedy = build_request(LoadSpec(requests=1, max_new_tokens=8, temperature=0.0), "hi")
    assert greedy.max_new_tokens == 8
    assert greedy.HasField("temperature")
    assert greedy.temperature == 0.0


def test_unreachable_address_fails_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(loadgen, "CONNECT_TIMEOUT_S", 0.5)
    with pytest.raises(ConnectionError, match=r"no gRPC server answers at 127\.0\.0\.1:9"):
        asyncio.run(run_load("127.0.0.1:9", LoadSpec(requests=1), ["hi"]))


def _assert_stream_is_consistent(record: RequestRecord, tokens_per_request: int) -> None:
    assert record.status == "OK", record.detail
    assert record.finish_reason == "STOP"  # the paced engine's whole answer
    assert record.completion_tokens() == tokens_per_request
    assert all(later >= earlier for earlier, later in zip(record.tokens, record.tokens[1:], strict=False))
    assert all(math.isfinite(delay) for delay in record.frame_delays_s())


def test_every_request_is_accounted_for_against_a_real_paced_pool(tmp_path):
    paced = PacedConfig(tokens_per_second=200.0, first_token_delay_s=0.01, tokens_per_request=8)
    with PacedPool(PoolSpec(workers=2, paced=paced), tmp_path) as pool:
        spec = LoadSpec(concurrency=4, requests=12)
        run = asyncio.run(run_load(pool.addr, spec, loadgen.BUILTIN_PROMPTS))
        worker_ids = pool.worker_ids()
    assert sorted(record.index for record in run.records) == list(range(12))
    for record in run.records:
        _assert_stream_is_consistent(record, paced.tokens_per_request)
    assert {record.worker_id for record in run.records} <= set(worker_ids)
    report = run.report()
    assert report.by_status == {"OK": 12}
    assert report.tokens == 12 * paced.tokens_per_request
    assert report.ttft_ms.count == 12
