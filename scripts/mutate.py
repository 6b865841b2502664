"""Mutation testing of the modules whose bugs users would feel first (`make mutate`, not part of
`make test`: it is slow). Each module is mutated with mutmut against only the fast in-process
tests that cover it (no suite that spawns processes), in its own scratch copy of the repository
(`.mutate/<module>/`), so one module can be run at a time and results are kept between runs:

    .venv/bin/python scripts/mutate.py                          # every module, one after another
    .venv/bin/python scripts/mutate.py router/validation.py     # one module (make mutate MODULE=...)
    .venv/bin/python scripts/mutate.py --list                   # the modules and their tests
    .venv/bin/python scripts/mutate.py --fresh router/job.py    # forget earlier results first
    .venv/bin/python scripts/mutate.py --tests-at 0ad59cc router/job.py   # with the tests of a revision

It prints, per module, the mutants killed / survived / timed out / not covered and the score, then
the surviving mutants' names (`cd .mutate/<slug> && ../../.venv/bin/mutmut show NAME` shows one).
TESTING.md records the scores and why each remaining survivor is equivalent.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / ".mutate"
MUTMUT = [sys.executable, "-m", "mutmut"]
COPIED = (
    "common",
    "protos",
    "router",
    "worker",
    "supervisor",
    "configs",
    "scripts",
    "tests",
    "pyproject.toml",
)


@dataclass(frozen=True)
class Target:
    module: str  # path of the mutated file
    tests: tuple[str, ...]  # the fast tests that cover it
    functions: tuple[str, ...] = ("*",)  # globs over the module's function names: a part of it only


# The router in process with emulated workers (tests/router_harness.py). A test of these that starts a
# process covers no function of the router in process, so mutmut never picks it for a mutant.
ROUTER_TESTS = (
    "tests/test_router_scheduling.py",
    "tests/test_router_faults.py",
    "tests/test_router_relay.py",
    "tests/test_router_server.py",
    "tests/test_metrics.py",
    "tests/test_cache_registry.py",
    "tests/test_router_agents.py",
    "tests/test_http_router.py",
)
TARGETS = (
    Target("router/validation.py", ("tests/test_router_validation.py",)),
    Target("router/scheduler.py", ROUTER_TESTS),
    Target("router/job.py", ROUTER_TESTS),
    # The registry on its own (a real Transport, DEALER peers; milliseconds a test), plus the cache
    # registry tests (a whole router, but four tests in about a second): against ROUTER_TESTS, where
    # every test starts a router, a mutant took ~15 s and the module about 2 hours.
    Target("router/workers.py", ("tests/test_worker_registry.py", "tests/test_cache_registry.py")),
    Target("worker/translate.py", ("tests/test_worker_translate.py",)),
    Target(
        "worker/service.py",
        ("tests/test_worker_request_path.py",),
        # the request path: a Generate or Cancel in, chunks out (not registration, heartbeats, stopping)
        functions=tuple(
            f"xǁWorkerServiceǁ{name}__mutmut_*"
            for name in ("_on_message", "_on_generate", "_on_cancel", "_deliver", "_on_chunk", "_abandon")
        ),
    ),
    Target(
        "worker/core/driver.py",
        ("tests/test_driver.py", "tests/test_llm_engine.py", "tests/test_kv_reuse.py"),
    ),
    Target("worker/core/sampling.py", ("tests/test_sampling.py",)),
    Target("worker/core/detokenizer.py", ("tests/test_detokenizer.py", "tests/test_stream_ends.py")),
    Target("worker/core/stop_strings.py", ("tests/test_stop_strings.py",)),
    Target("worker/core/tokenizer.py", ("tests/test_tokenizer.py",)),
    Target("worker/core/chat_template.py", ("tests/test_chat_template.py", "tests/test_tokenizer.py")),
    Target(
        "worker/core/llm_engine.py",
        (
            "tests/test_llm_engine.py",
            "tests/test_kv_reuse.py",
            "tests/test_raw_prompt.py",
            "tests/test_stream_ends.py",
        ),
    ),
)
# As mutmut's own table (mutmut/stats.py); a timeout (the tests hung or ran out of CPU time) counts as a kill.
STATUS_BY_EXIT_CODE = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped"}
STATUS_BY_EXIT_CODE |= {code: "timeout" for code in (36, 24, -24, 152, 255)}
STATUS_BY_EXIT_CODE |= {-11: "segfault", -9: "segfault"}


def slug(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


def prepare(target: Target, fresh: bool, tests_at: str | None = None) -> Path:
    """The module's scratch copy of the repository with its mutmut configuration; with `tests_at`, its
    tests/ are those of that git revision (a baseline: the score before new tests were written)."""
    workdir = SCRATCH / (slug(target.module) + (f"@{tests_at}" if tests_at else ""))
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source, copy = REPO / name, workdir / name
        if source.is_dir():
            shutil.copytree(source, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, copy)
    if tests_at:
        shutil.rmtree(workdir / "tests")
        archive = subprocess.run(
            ["git", "archive", tests_at, "tests"], cwd=REPO, check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive.stdout, check=True)
    selection = "\n    ".join(test for test in target.tests if (workdir / test).exists())
    (workdir / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths =\n    common\n    protos\n    router\n    worker\n"
        f"only_mutate = {target.module}\n"
        "also_copy =\n    supervisor\n    configs\n    scripts\n"
        f"pytest_add_cli_args_test_selection =\n    {selection}\n"
        # a mutant that makes a test wait forever fails at this bound (a kill), not at the suite's 300 s
        "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -q\n    --timeout=30\n"
        # mutants are tried in forks of a process that has imported grpc: fork from a clean server
        "process_isolation = forkserver\n"
    )
    return workdir


def run(target: Target, fresh: bool, jobs: int, tests_at: str | None) -> dict[str, list[str]]:
    workdir = prepare(target, fresh, tests_at)
    # tests/conftest.py looks for the fixture data beside the repository: from the scratch copy, point
    # it at the real one's neighbour, or the tests that need it would skip and their mutants survive.
    os.environ.setdefault("POOL_TEST_FIXTURES", str(REPO.parent / "shared" / "fixtures"))
    patterns = [f"{slug(target.module)}.{functions}" for functions in target.functions]
    started = time.monotonic()
    subprocess.run([*MUTMUT, "run", "--max-children", str(jobs), *patterns], cwd=workdir, check=False)
    elapsed = time.monotonic() - started
    results = collect(workdir, target)
    report(target, results, elapsed)
    return results


def collect(workdir: Path, target: Target) -> dict[str, list[str]]:
    """Mutant names by status, read from mutmut's per-file results."""
    meta = workdir / "mutants" / f"{target.module}.meta"
    exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
    prefix = slug(target.module) + "."
    by_status: dict[str, list[str]] = collections.defaultdict(list)
    for name, code in sorted(exit_codes.items()):
        if any(fnmatch.fnmatchcase(name.removeprefix(prefix), functions) for functions in target.functions):
            by_status[STATUS_BY_EXIT_CODE.get(code, "not run" if code is None else f"exit {code}")].append(
                name
            )
    return by_status


def report(target: Target, by_status: dict[str, list[str]], elapsed: float) -> None:
    killed = sum(len(by_status.get(status, [])) for status in ("killed", "timeout", "segfault"))
    judged = killed + sum(len(by_status.get(status, [])) for status in ("survived", "no tests"))
    score = f"{100 * killed / judged:.1f}%" if judged else "-"
    counts = ", ".join(f"{status} {len(names)}" for status, names in sorted(by_status.items()))
    print(f"\n== {target.module}: {counts}; killed {killed}/{judged} = {score} ({elapsed:.0f} s)")
    for status in ("survived", "no tests"):
        for name in by_status.get(status, []):
            print(f"   {status}: {name}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("modules", nargs="*", help="module paths (default: all of them)")
    parser.add_argument("--list", action="store_true", help="print the modules and their tests, run nothing")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results of these modules")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tried at once (default 2)")
    parser.add_argument(
        "--tests-at", metavar="REV", help="use the tests of this git revision (the before of TESTING.md)"
    )
    args = parser.parse_args()
    by_module = {target.module: target for target in TARGETS}
    unknown = [module for module in args.modules if module not in by_module]
    if unknown:
        parser.error(f"not a mutation target: {', '.join(unknown)} (see --list)")
    targets = [by_module[module] for module in args.modules] or list(TARGETS)
    if args.list:
        for target in targets:
            print(f"{target.module} [{' '.join(target.functions)}]: {' '.join(target.tests)}")
        return 0
    for target in targets:
        run(target, args.fresh, args.jobs, args.tests_at)
    return 0


if __name__ == "__main__":
    sys.exit(main())
