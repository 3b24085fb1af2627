"""``python -m worker``: run one worker process until SIGTERM or SIGINT.

Flags default from ``ANDES_*`` environment variables so a deployment configures workers
without command lines. Prints ``READY worker <id>`` on stdout once the scheduler accepted the
registration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import uvloop
from prometheus_client import start_http_server

from andes.heap import settle_heap
from andes.tls import ChannelTls, TlsError
from andes.tokenstream import DEFAULT_PREFIX
from worker.engine import Engine
from worker.engine_process import ENGINE_NICE, FEEDER_NICE, parse_cpus
from worker.service import BACKENDS, WorkerConfig, WorkerService, start_engine
from worker.session import RegistrationRefusedError
from worker.vllm_backend import VllmConfig


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--backend", choices=BACKENDS, default=env("ANDES_WORKER_BACKEND", "sim"))
    parser.add_argument("--profile", default=env("ANDES_PROFILE", "a100-opt13b"),
                        help="latency profile name (profiles/) or path to a JSON profile")
    parser.add_argument("--worker-id",
                        default=env("ANDES_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"))
    parser.add_argument("--scheduler", default=env("ANDES_SCHEDULER_ADDR", "127.0.0.1:50052"),
                        help="scheduler gRPC address host:port")
    parser.add_argument("--redis", default=env("ANDES_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--redis-prefix", default=env("ANDES_REDIS_PREFIX", DEFAULT_PREFIX))
    tls = parser.add_argument_group("TLS to the scheduler (default: plaintext)")
    tls.add_argument("--scheduler-tls-ca", default=env("ANDES_SCHEDULER_TLS_CA", ""),
                     help="PEM CA that verifies the scheduler: dial it over TLS")
    tls.add_argument("--scheduler-tls-cert", default=env("ANDES_SCHEDULER_CLIENT_CERT", ""),
                     help="PEM certificate this worker presents to the scheduler (mutual TLS)")
    tls.add_argument("--scheduler-tls-key", default=env("ANDES_SCHEDULER_CLIENT_KEY", ""),
                     help="PEM private key of --scheduler-tls-cert")
    tls.add_argument("--scheduler-tls-server-name",
                     default=env("ANDES_SCHEDULER_TLS_SERVER_NAME", ""),
                     help="the name the scheduler's certificate carries, if not the "
                          "--scheduler host")
    parser.add_argument("--kv-blocks", type=int, default=_env_int("ANDES_KV_BLOCKS"),
                        help="override the profile's KV cache blocks")
    parser.add_argument("--max-batch", type=int, default=_env_int("ANDES_MAX_BATCH"),
                        help="override the profile's most sequences per iteration")
    parser.add_argument("--host-kv-blocks", type=int,
                        default=_env_int("ANDES_HOST_KV_BLOCKS") or 0,
                        help="host memory for swapped-out KV, in blocks (0: no swap)")
    parser.add_argument("--publish-interval-ms", type=float,
                        default=float(env("ANDES_PUBLISH_INTERVAL_MS", "50")),
                        help="a running request's tokens wait up to this long to be published "
                             "together (its first tokens and its end never wait; 0: every "
                             "iteration)")
    parser.add_argument("--report-interval-ms", type=float,
                        default=float(env("ANDES_REPORT_INTERVAL_MS", "20")),
                        help="a step report that only carries running requests' progress "
                             "waits up to this long for the next step's (endings, forced "
                             "preemptions and applied plans never wait; 0: every iteration)")
    vllm = parser.add_argument_group("vllm backend")
    vllm.add_argument("--model", default=env("ANDES_MODEL"),
                      help="model directory (HF format; nothing is downloaded)")
    vllm.add_argument("--dtype", default=env("ANDES_DTYPE", "auto"))
    vllm.add_argument("--max-model-len", type=int, default=_env_int("ANDES_MAX_MODEL_LEN") or 2048)
    vllm.add_argument("--max-batched-tokens", type=int,
                      default=_env_int("ANDES_MAX_BATCHED_TOKENS") or 2048,
                      help="token budget of one iteration (prefill chunks plus decodes)")
    vllm.add_argument("--block-size", type=int, default=_env_int("ANDES_BLOCK_SIZE"),
                      help="KV block size in tokens (default: vLLM's, 128 on CPU)")
    vllm.add_argument("--kv-cache-space-gib", type=float,
                      default=float(env("VLLM_CPU_KVCACHE_SPACE", "1")),
                      help="CPU: memory reserved for the KV cache, GiB")
    vllm.add_argument("--kv-cache-memory-bytes", type=int,
                      default=_env_int("ANDES_KV_CACHE_MEMORY_BYTES"),
                      help="GPU: memory reserved for the KV cache, bytes")
    vllm.add_argument("--seed", type=int, default=_env_int("ANDES_SEED") or 0)
    vllm.add_argument("--engine-nice", type=int,
                      default=int(env("ANDES_ENGINE_NICE", str(ENGINE_NICE))),
                      help="niceness of the engine's process: lower runs first (below 0 needs "
                           "root or CAP_SYS_NICE, else the engine keeps the worker's)")
    vllm.add_argument("--worker-nice", type=int,
                      default=int(env("ANDES_WORKER_NICE", str(FEEDER_NICE))),
                      help="niceness of the worker's own process, which feeds the engine "
                           "every step (below 0 needs root or CAP_SYS_NICE)")
    vllm.add_argument("--engine-cpus", default=env("ANDES_ENGINE_CPUS", ""),
                      help="CPUs the engine's process runs on, as taskset -c lists them (e.g. "
                           "3 or 2-7); the worker keeps off them, and one compute thread per "
                           "CPU (default: no pinning)")
    vllm.add_argument("--no-measure-profile", action="store_true",
                      help="register a flat default profile instead of measuring at start-up")
    parser.add_argument("--metrics-port", type=int,
                        default=_env_int("ANDES_WORKER_METRICS_PORT") or 0,
                        help="serve Prometheus metrics on this port (0: off)")
    parser.add_argument("--metrics-addr", default=env("ANDES_METRICS_ADDR", "127.0.0.1"))
    parser.add_argument("--log-level", default=env("ANDES_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    for name in ("kv_blocks", "max_batch"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.host_kv_blocks < 0:
        parser.error("--host-kv-blocks must be >= 0")
    for name in ("engine_nice", "worker_nice"):
        if not -20 <= getattr(args, name) <= 19:
            parser.error(f"--{name.replace('_', '-')} must be in [-20, 19]")
    try:
        args.engine_cpus = parse_cpus(args.engine_cpus)
    except ValueError as err:
        parser.error(f"--engine-cpus: {err}")
    if not 0 <= args.publish_interval_ms < 10_000:
        parser.error("--publish-interval-ms must be in [0, 10000)")
    if not 0 <= args.report_interval_ms < 1_000:
        parser.error("--report-interval-ms must be in [0, 1000)")
    if args.backend == "vllm" and not args.model:
        parser.error("--backend vllm needs --model DIR (or ANDES_MODEL)")
    return args


async def _main(args: argparse.Namespace, config: WorkerConfig, engine: Engine,
                engine_thread: ThreadPoolExecutor | None) -> None:
    service = WorkerService(
        config,
        engine=engine,
        engine_thread=engine_thread,
        on_registered=lambda: print(f"READY worker {config.worker_id}", flush=True),
    )
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_addr)
    settle_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.run(stop)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The worker's settings from its parsed command line."""
    return WorkerConfig(
        worker_id=args.worker_id,
        scheduler=args.scheduler,
        redis_url=args.redis,
        backend=args.backend,
        profile=args.profile,
        redis_prefix=args.redis_prefix,
        kv_blocks=args.kv_blocks,
        max_batch=args.max_batch,
        host_kv_blocks=args.host_kv_blocks,
        publish_interval_s=args.publish_interval_ms / 1000,
        report_interval_s=args.report_interval_ms / 1000,
        engine_nice=args.engine_nice,
        worker_nice=args.worker_nice,
        engine_cpus=args.engine_cpus,
        scheduler_tls=ChannelTls(ca=args.scheduler_tls_ca, cert=args.scheduler_tls_cert,
                                 key=args.scheduler_tls_key,
                                 server_name=args.scheduler_tls_server_name),
        vllm=VllmConfig(
            model=args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_batched_tokens,
            block_size=args.block_size,
            kv_cache_space_gib=args.kv_cache_space_gib,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            seed=args.seed,
            measure_profile=not args.no_measure_profile,
        ) if args.model else None,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = worker_config(args)
    try:
        config.scheduler_tls.load()  # checked before the engine's slow start
    except TlsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        engine, engine_thread = start_engine(config)
    except (ValueError, RuntimeError) as err:  # bad profile, backend, model or vLLM version
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        uvloop.run(_main(args, config, engine, engine_thread))
    except RegistrationRefusedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        close = getattr(engine, "close", None)  # an engine process
        if close is not None:
            close()
    return 0
