"""Where a running process spends its CPU: py-spy samples summarized per function.

    python -m bench.profile PID --seconds 10 --out router.txt

Self time is the share of busy samples with the function at the top of the stack; inclusive time
the share with it anywhere on the stack. Idle samples (a thread waiting in epoll, a lock, a sleep)
are not counted, so the shares add up over the work the process did: py-spy leaves them out of
Python-only stacks itself, but with native frames it reports a thread parked in a system call like
any other, so stacks whose top frame is one of WAITING_CALLS are dropped here.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SAMPLE_RATE_HZ = 250
# A raw frame reads "function (path/to/file.py:123)"; the line number is dropped so that samples
# in different lines of one function add up.
_LINE_NUMBER = re.compile(r":\d+\)$")
# C functions in which a thread sleeps until something happens (libc's names).
WAITING_CALLS = frozenset({
    "epoll_wait", "epoll_pwait", "poll", "ppoll", "select", "pselect", "nanosleep", "clock_nanosleep",
    "pthread_cond_wait", "pthread_cond_timedwait", "__futex_abstimed_wait_common", "sem_wait",
    "sem_timedwait", "accept", "accept4",
})  # fmt: skip


@dataclass(frozen=True)
class ProfileSummary:
    samples: int  # busy samples
    expected_samples: int  # sampling ticks over the duration (what one always-busy thread would give)
    self_share: list[tuple[str, float]]  # (function, fraction of busy samples), largest first
    inclusive_share: list[tuple[str, float]]

    def format(self, top: int = 15) -> str:
        lines = [
            f"{self.samples} busy samples ({self.expected_samples} sampling ticks per thread)",
            "self time:",
            *(f"  {share:6.1%}  {name}" for name, share in self.self_share[:top]),
            "inclusive time:",
            *(f"  {share:6.1%}  {name}" for name, share in self.inclusive_share[:top]),
        ]
        return "\n".join(lines)


def summarize_collapsed(lines: Iterable[str], expected_samples: int = 0) -> ProfileSummary:
    """Summarize py-spy's raw (collapsed-stack) output: one `frame;frame;... count` line per stack."""
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.strip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        if frames[-1].split(" (", 1)[0] in WAITING_CALLS:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            anywhere[frame] += count
    return ProfileSummary(
        samples=total,
        expected_samples=expected_samples,
        self_share=[(name, count / total) for name, count in own.most_common()] if total else [],
        inclusive_share=[(name, count / total) for name, count in anywhere.most_common()] if total else [],
    )


def record(pid: int, seconds: float, raw_path: Path, native: bool = True) -> ProfileSummary:
    """Sample the process for `seconds`; the raw stacks are kept in raw_path.

    native: include C frames (gRPC's Cython core, libzmq, libc), which is where much of the time
    goes; py-spy then pauses the process for each sample, so profile in a pass of its own.
    """
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [
        py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", str(SAMPLE_RATE_HZ), "--format", "raw", "--output", str(raw_path),
        *(["--native"] if native else ["--nonblocking"]),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0 or not raw_path.exists():
        raise RuntimeError(f"py-spy failed ({completed.returncode}): {completed.stderr.strip()[-500:]}")
    expected = int(SAMPLE_RATE_HZ * max(1, round(seconds)))
    return summarize_collapsed(raw_path.read_text().splitlines(), expected)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("profile.txt"), help="raw stacks (collapsed)")
    parser.add_argument("--python-only", action="store_true", help="no C frames; never pauses the process")
    args = parser.parse_args(argv)
    print(record(args.pid, args.seconds, args.out, native=not args.python_only).format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
