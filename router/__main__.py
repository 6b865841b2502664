"""Run the router alone: `python -m router --config configs/default.yaml`.

SIGTERM or SIGINT starts a graceful drain of both fronts (health NOT_SERVING and HTTP /health 503,
new calls UNAVAILABLE or HTTP 503, open calls finish up to router.drain_timeout_s), then the process
exits 0. SIGHUP re-reads the TLS files, the API keys, the worker allowlist (common/security.py) and the
config file's models (which one is the default); the admin API's reload also reaches the host agents.
It exits 1 if the config is bad, key material cannot be read, an address cannot be bound, or one of
the router's loops dies.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from pathlib import Path

from common.config import ConfigError, PoolConfig, load_config
from common.security import SecurityError
from router import event_loop
from router.server import RouterServer
from router.validation import RequestLimits


def main() -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the handler is in place: a reload must not kill it
    args = _parse_args()
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config) if args.config else PoolConfig()
    except ConfigError as error:
        logging.getLogger("router").error("bad config: %s", error)
        return 1
    overrides = {
        key: value
        for key, value in (("listen", args.listen), ("zmq_bind", args.zmq_bind))
        if value is not None
    }
    config = dataclasses.replace(config, router=dataclasses.replace(config.router, **overrides))
    if args.admin_listen is not None:
        config = dataclasses.replace(
            config, admin=dataclasses.replace(config.admin, listen=args.admin_listen)
        )
    config_path = Path(args.config) if args.config else None
    try:
        return event_loop.run(_serve(config, config_path), config.router.event_loop)
    except (OSError, SecurityError) as error:
        logging.getLogger("router").error("%s", error)
        return 1


async def _serve(config: PoolConfig, config_path: Path | None) -> int:
    limits = RequestLimits(
        max_request_bytes=config.router.max_request_bytes,
        max_new_tokens=max(model.context_size for model in config.served_models),
    )
    server = RouterServer(
        config.router,
        limits,
        config.http,
        security=config.security,
        pool=config,
        config_path=config_path,
    )
    await server.start()
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    logging.getLogger("router").info("event loop: %s", type(loop).__module__.split(".")[0])
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    stopped = asyncio.create_task(stop_requested.wait())
    failed = asyncio.create_task(server.failed.wait())
    await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
    if server.failed.is_set():
        stopped.cancel()
        await server.stop()
        return 1
    failed.cancel()
    await server.drain()
    return 0


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="pool YAML config (default: the built-in defaults)")
    parser.add_argument("--listen", help="gRPC address, overrides router.listen (e.g. 127.0.0.1:0)")
    parser.add_argument(
        "--zmq-bind", help="worker endpoint, overrides router.zmq_bind (e.g. tcp://127.0.0.1:*)"
    )
    parser.add_argument("--admin-listen", help="admin API address, overrides admin.listen")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
