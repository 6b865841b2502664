"""`python -m worker --config FILE --dev-id N [--model NAME] [--router tcp://host:port] [--worker-id ID]`

One worker process: loads the engine for device N (or the device group "0,1": a bmodel compiled
for two chips), registers with the router and serves until
SIGTERM/SIGINT. The supervisor starts one per (device, index); started by hand, it can join a
router on another host.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys

from common.config import ConfigError, load_config
from common.devices import DeviceGroupError, format_group, parse_group
from worker.affinity import limit_blas_threads, pin_to_core_share

_MAX_ROUTING_ID_BYTES = 255  # ZeroMQ's limit


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"worker: config {args.config}: {error}", file=sys.stderr)
        return 2
    if args.model is not None:
        model = config.model_named(args.model)
        if model is None:
            served = ", ".join(served.name for served in config.served_models)
            print(f"worker: --model {args.model!r} is not in the config (it has: {served})", file=sys.stderr)
            return 2
        config = dataclasses.replace(config, model=model, models=())  # this worker's model only
    devices = parse_group(config.workers.groups[0] if args.dev_id is None else args.dev_id)
    group = format_group(devices)
    worker_id = args.worker_id or f"{socket.gethostname()}-dev{group}-w{args.index}-{os.getpid()}"
    if not 0 < len(worker_id.encode()) <= _MAX_ROUTING_ID_BYTES:
        print(f"worker: --worker-id must be 1 to {_MAX_ROUTING_ID_BYTES} bytes", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s worker {worker_id}: %(message)s",
        stream=sys.stderr,
    )
    limit_blas_threads(config.model.threads)
    if config.model.engine == "numpy":
        slot = devices[0] * config.workers.per_device + args.index if args.cpu_slot is None else args.cpu_slot
        cores = pin_to_core_share(slot, config.model.threads)
        logging.getLogger("worker").info("pinned to cores %s", cores)
    # Imported only now: the engine backends load numpy, which reads the BLAS variables set above.
    from worker.service import WorkerIdentity, run_worker

    endpoint = args.router or config.router.worker_endpoint()
    return run_worker(config, WorkerIdentity(worker_id, devices, args.restarts), endpoint)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker", description="One worker process of the pool.")
    parser.add_argument("--config", required=True, help="the pool's YAML config")
    parser.add_argument(
        "--dev-id",
        help="device id, or a device group such as 0,1 (DEV_ID); default: the first of workers.devices",
    )
    parser.add_argument(
        "--router", help="ZeroMQ endpoint to connect to; default: the config's router.zmq_bind"
    )
    parser.add_argument("--worker-id", help="unique id in the pool; default: HOST-devN-wINDEX-PID")
    parser.add_argument("--model", help="which of the config's models to serve; default: the first")
    parser.add_argument(
        "--cpu-slot", type=int, help="numpy: which share of the cores to pin to (set by the supervisor)"
    )
    parser.add_argument("--index", type=int, default=0, help="this worker's index on its device (0-based)")
    parser.add_argument(
        "--restarts", type=int, default=0, help="set by the supervisor: restarts of this slot so far"
    )
    args = parser.parse_args(argv)
    if args.dev_id is not None:
        try:
            parse_group(args.dev_id)
        except DeviceGroupError as error:
            parser.error(f"--dev-id: {error}")
    if args.index < 0:
        parser.error("--index must be >= 0")
    if args.cpu_slot is not None and args.cpu_slot < 0:
        parser.error("--cpu-slot must be >= 0")
    if args.restarts < 0:
        parser.error("--restarts must be >= 0")
    return args


if __name__ == "__main__":
    sys.exit(main())
