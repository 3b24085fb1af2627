"""``python -m scheduler_service``: run the scheduler until SIGTERM or SIGINT.

Flags default from ``ANDES_*`` environment variables. Prints ``READY scheduler <host:port>``
on stdout once it serves (with the real port when ``--listen`` asks for port 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import uvloop
from prometheus_client import start_http_server

from andes.heap import settle_heap
from andes.policies import POLICY_NAMES, AndesPolicy, make_policy
from andes.tls import ServerCredentials, ServerTls, TlsError
from scheduler_service.scheduler import Scheduler
from scheduler_service.server import SchedulerServer


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m scheduler_service", description=__doc__)
    parser.add_argument("--listen", default=env("ANDES_SCHEDULER_LISTEN", "127.0.0.1:50052"),
                        help="gRPC address to bind, host:port (port 0: any free port)")
    parser.add_argument("--policy", choices=POLICY_NAMES, default=env("ANDES_POLICY", "andes"))
    parser.add_argument("--preemption-mode", choices=("recompute", "swap"),
                        default=env("ANDES_PREEMPTION_MODE", "recompute"))
    parser.add_argument("--max-preemptions", type=int,
                        default=_env_int("ANDES_MAX_PREEMPTIONS"),
                        help="andes: planned preemptions per request (default: the policy's, "
                             f"{AndesPolicy.max_preemptions}, as in the paper)")
    parser.add_argument("--plan-interval-ms", type=float,
                        default=_env_float("ANDES_PLAN_INTERVAL_MS", 50.0),
                        help="least time between two plans of one worker")
    parser.add_argument("--replan-after-s", type=float,
                        default=_env_float("ANDES_REPLAN_AFTER_S", 1.0),
                        help="plan each worker at least this often")
    parser.add_argument("--worker-timeout-s", type=float,
                        default=_env_float("ANDES_WORKER_TIMEOUT_S", 1.5),
                        help="a worker silent this long is dead")
    parser.add_argument("--reassign-grace-s", type=float,
                        default=_env_float("ANDES_REASSIGN_GRACE_S", 1.0),
                        help="how long a dead worker's requests wait for it to come back")
    parser.add_argument("--max-queue", type=int, default=int(env("ANDES_MAX_QUEUE", "0")),
                        help="most unfinished requests per worker (0: no limit)")
    parser.add_argument("--metrics-port", type=int,
                        default=int(env("ANDES_SCHEDULER_METRICS_PORT", "0")),
                        help="serve Prometheus metrics on this port (0: off)")
    parser.add_argument("--metrics-addr", default=env("ANDES_METRICS_ADDR", "127.0.0.1"))
    parser.add_argument("--log-level", default=env("ANDES_LOG_LEVEL", "INFO"))
    parser.add_argument("--tls-cert", default=env("ANDES_SCHEDULER_TLS_CERT", ""),
                        help="PEM certificate chain: serve TLS only (empty: plaintext)")
    parser.add_argument("--tls-key", default=env("ANDES_SCHEDULER_TLS_KEY", ""),
                        help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", default=env("ANDES_SCHEDULER_TLS_CLIENT_CA", ""),
                        help="PEM CA: accept only clients (gateways, workers) presenting a "
                             "certificate it signed (mutual TLS)")
    args = parser.parse_args(argv)
    for name in ("plan_interval_ms", "replan_after_s", "worker_timeout_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.reassign_grace_s < 0 or args.max_queue < 0 or (
        args.max_preemptions is not None and args.max_preemptions < 0
    ):
        parser.error("--reassign-grace-s, --max-queue and --max-preemptions must be >= 0")
    return args


def build_scheduler(args: argparse.Namespace) -> Scheduler:
    plan_interval_s = args.plan_interval_ms / 1000.0
    return Scheduler(
        make_policy(args.policy, preemption_mode=args.preemption_mode,
                    max_preemptions=args.max_preemptions, plan_interval_s=plan_interval_s),
        plan_interval_s=plan_interval_s,
        replan_after_s=args.replan_after_s,
        worker_timeout_s=args.worker_timeout_s,
        reassign_grace_s=args.reassign_grace_s,
        max_queue_per_worker=args.max_queue or None,
    )


async def _main(args: argparse.Namespace, credentials: ServerCredentials | None) -> None:
    server = SchedulerServer(build_scheduler(args), args.listen, credentials)
    await server.start()
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_addr)
    settle_heap()
    print(f"READY scheduler {server.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger(__name__).info("stopping")
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        # Checked before serving: a bad file is one line now, not a failed handshake later.
        credentials = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca).load()
    except TlsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    uvloop.run(_main(args, credentials))
    return 0
