"""The benchmark's derived figures on known inputs: idle gaps between a worker's requests, frames in a
window, the engine report, py-spy's collapsed stacks and the verdicts against the targets."""

from __future__ import annotations

import json

import pytest

from bench import targets
from bench.engine import read_report
from bench.http_vs_grpc import CHIP_PACE, lateness_ms
from bench.profile import summarize_collapsed
from bench.router_overhead import _window_frames, idle_gaps
from bench.stats import RequestRecord
from common.config import PacedConfig

MS = 1_000_000  # ns
PACE = PacedConfig(tokens_per_second=10.0, first_token_delay_s=0.1, tokens_per_request=3)


def _served(index: int, worker: str, sent_ms: int, first_chunk_ms: int) -> RequestRecord:
    """A 3-token request whose chunks were made 100 ms apart from first_chunk_ms on (worker clock)."""
    created = [(first_chunk_ms + 100 * step) * MS for step in range(3)]
    return RequestRecord(
        index=index,
        sent_ns=sent_ms * MS,
        recv_ns=[at + MS for at in created],
        create_ns=created,
        tokens=[1, 2, 3],
        status="OK",
        worker_id=worker,
    )


def test_idle_gap_is_time_from_last_chunk_to_next_dispatch_while_a_request_waits():
    # w0 ends its first request at 300 ms (last chunk); the next one reaches it at 305 ms
    # (first chunk at 405 ms minus the 100 ms first-token delay), sent long before: 5 ms idle.
    first = _served(0, "w0", sent_ms=0, first_chunk_ms=100)
    second = _served(1, "w0", sent_ms=0, first_chunk_ms=405)
    assert idle_gaps([first, second], PACE, 0, 10_000 * MS) == pytest.approx([0.005])


def test_idle_gap_not_counted_when_nothing_was_waiting():
    first = _served(0, "w0", sent_ms=0, first_chunk_ms=100)
    later = _served(1, "w0", sent_ms=500, first_chunk_ms=700)  # sent after w0 had finished
    assert idle_gaps([first, later], PACE, 0, 10_000 * MS) == []


def test_a_request_never_started_counts_as_waiting_and_the_window_bounds_apply():
    first = _served(0, "w0", sent_ms=0, first_chunk_ms=100)  # ends at 300 ms
    second = _served(1, "w0", sent_ms=310, first_chunk_ms=420)  # sent after that, reached w0 at 320
    assert idle_gaps([first, second], PACE, 0, 10_000 * MS) == []
    queued = RequestRecord(index=2, sent_ns=250 * MS, status="CANCELLED")  # waiting, never started
    assert idle_gaps([first, second, queued], PACE, 0, 10_000 * MS) == pytest.approx([0.02])
    assert idle_gaps([first, second, queued], PACE, 301 * MS, 10_000 * MS) == []


def test_window_frames_counts_frames_and_the_tokens_they_added():
    record = RequestRecord(
        index=0, sent_ns=0, recv_ns=[10, 20, 30, 40], create_ns=[0] * 4, tokens=[1, 3, 4, 4]
    )
    assert _window_frames([record], 15, 40) == (2, 3)  # frames at 20 (+2 tokens) and 30 (+1)
    assert _window_frames([record], 0, 100) == (4, 4)


def test_engine_report_is_read_from_the_scripts_json_and_checked():
    numpy = {
        "load_s": 4.8,
        "prompt_tokens": 128,
        "prefill_tokens_per_s": 313.8,
        "new_tokens": 63,
        "decode_tokens_per_s": 26.7,
        "peak_rss_mb": 880.2,
    }
    document = {"model": "builtin:smollm2", "threads": 1, "backends": {"numpy": numpy}}
    assert read_report(json.dumps(document)) == document
    with pytest.raises(ValueError, match="no `backends`"):
        read_report(json.dumps({"model": "x"}))
    with pytest.raises(ValueError, match="lacks decode_tokens_per_s for backend 'numpy'"):
        read_report(json.dumps({"backends": {"numpy": {**numpy, "decode_tokens_per_s": "fast"}}}))
    with pytest.raises(ValueError, match="not valid"):
        read_report("model builtin:smollm2: a table, not JSON")


def test_collapsed_stacks_give_self_and_inclusive_shares():
    lines = [
        "main (app.py:1);loop (app.py:5);relay (app.py:9) 6",
        "main (app.py:1);loop (app.py:5);relay (app.py:10) 2",  # same function, another line
        "main (app.py:1);loop (app.py:7) 2",
        "main (app.py:1);loop (app.py:8);epoll_wait (libc.so.6) 30",  # parked: not work
        "garbage line",
    ]
    summary = summarize_collapsed(lines, expected_samples=20)
    assert summary.samples == 10
    assert summary.self_share[0] == ("relay (app.py)", pytest.approx(0.8))
    assert dict(summary.inclusive_share)["loop (app.py)"] == pytest.approx(1.0)
    assert dict(summary.self_share)["loop (app.py)"] == pytest.approx(0.2)


def _latency_level(streams: int, p50: float, p99: float) -> dict:
    return {"streams": streams, "added_latency_ms": {"p50": p50, "p99": p99}}


def test_verdicts_compare_with_the_issue_targets():
    results = {
        "router": {
            "latency": {"levels": [_latency_level(16, 9.0, 9.0), _latency_level(64, 0.4, 2.5)]},
            "memory": {"queued": 1000, "rss_queued_mb": 70.0},
        }
    }
    verdicts = {verdict.what: verdict for verdict in targets.evaluate(results)}
    assert verdicts["added latency per token @64 streams, p50"].met is True
    assert verdicts["added latency per token @64 streams, p99"].met is False
    assert verdicts["router RSS with 1,000 queued"].met is True
    assert verdicts["pool efficiency @128 workers"].met is None  # not measured
    assert "MISSED" in targets.format_table(list(verdicts.values()))


def test_http_vs_grpc_lateness_is_measured_against_the_paced_schedule() -> None:
    sent = 1_000_000_000
    due_third_token_ns = sent + int((CHIP_PACE.first_token_delay_s + 2 / CHIP_PACE.tokens_per_second) * 1e9)
    assert lateness_ms(sent, [(due_third_token_ns + 3_000_000, 3)]) == [pytest.approx(3.0, abs=1e-3)]
