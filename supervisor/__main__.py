"""`python -m supervisor --config FILE [--router tcp://host:port]`

Starts the pool on this host: the router (`python -m router`) and one worker per configured
(device, index), each pinned to its DEV_ID; restarts any that die, with backoff; SIGINT/SIGTERM
stops the router first (it drains), then the workers. With --router, runs workers only, joined
to a router on another host. Either way it registers with the router as the host agent of its
devices (the admin API scales them); SIGHUP re-reads the config and applies the difference live.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from common.config import ConfigError, load_config
from common.security import SecurityError, check_worker_link
from supervisor.supervisor import Supervisor, cpu_budget_problem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor", description="Run the pool on this host.")
    parser.add_argument("--config", required=True, type=Path, help="the pool's YAML config")
    parser.add_argument(
        "--router",
        metavar="ENDPOINT",
        help="start no router: connect the workers to this one (tcp://host:port)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s supervisor: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"supervisor: config {args.config}: {error}", file=sys.stderr)
        return 2
    try:  # refused here once, not by every worker in a restart loop
        check_worker_link(args.router or config.router.zmq_bind, config.security)
    except SecurityError as error:
        print(f"supervisor: config {args.config}: {error}", file=sys.stderr)
        return 2
    problem = cpu_budget_problem(config, cores=len(os.sched_getaffinity(0)))
    if problem:
        print(f"supervisor: config {args.config}: refusing to start: {problem}", file=sys.stderr)
        return 2
    return Supervisor(args.config, config, remote_router=args.router).run()


if __name__ == "__main__":
    sys.exit(main())
