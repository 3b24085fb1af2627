"""One worker process: an engine, its loop, its scheduler session and its Redis connection.

The CLI and the tests both start workers through :class:`WorkerService`, so an in-process
worker in a test is the same object graph as ``python -m worker``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from redis.asyncio import Redis

from andes.latency import load_profile
from andes.redis_packing import HiredisPackedConnection
from andes.tls import ChannelTls
from andes.tokenstream import DEFAULT_PREFIX
from worker.engine import Engine
from worker.engine_process import (
    ENGINE_NICE,
    FEEDER_NICE,
    EngineProcess,
    avoid_cpus,
    set_nice,
)
from worker.loop import WorkerLoop
from worker.publisher import TokenPublisher
from worker.session import SchedulerSession, cancel_and_wait
from worker.sim_backend import SimBackend
from worker.vllm_backend import VllmConfig

log = logging.getLogger(__name__)

BACKENDS = ("sim", "vllm")


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    scheduler: str
    redis_url: str
    backend: str = "sim"
    profile: str = "a100-opt13b"
    redis_prefix: str = DEFAULT_PREFIX
    kv_blocks: int | None = None
    """Override the profile's KV budget (small budgets exercise preemption)."""
    max_batch: int | None = None
    host_kv_blocks: int = 0
    """Host memory for swapped KV, in blocks (0: swap falls back to recompute)."""
    heartbeat_s: float = 0.5
    publish_interval_s: float = 0.0
    """How long a running request's tokens may wait to be published together (see
    :mod:`worker.publisher`; 0: every iteration)."""
    report_interval_s: float = 0.0
    """How long a step report of running requests' progress alone may wait for the next
    step's (see :meth:`worker.loop.WorkerLoop._report_may_wait`; 0: every iteration)."""
    vllm: VllmConfig | None = None
    """The engine's settings for the ``vllm`` backend (``kv_blocks`` and ``max_batch`` above
    override its ``num_gpu_blocks`` and ``max_num_seqs``)."""
    scheduler_tls: ChannelTls = field(default_factory=ChannelTls)
    """TLS of the session with the scheduler (empty: plaintext)."""
    engine_nice: int = ENGINE_NICE
    """Niceness of a real engine's process (see :mod:`worker.engine_process`)."""
    worker_nice: int = FEEDER_NICE
    """Niceness of the worker itself when its engine runs in a process of its own (see
    :data:`worker.engine_process.FEEDER_NICE`)."""
    engine_cpus: frozenset[int] = frozenset()
    """CPUs a real engine's process runs on alone (the worker keeps off them); empty: the
    kernel places it (see :func:`worker.engine_process.pin_to_cpus`)."""


def start_engine(config: WorkerConfig) -> tuple[Engine, ThreadPoolExecutor | None]:
    """The engine, and for a blocking one the thread the loop calls it from.

    A real engine runs in a process of its own (:mod:`worker.engine_process`: it would
    otherwise compete for the GIL with the worker's I/O); the emulated one runs in-process."""
    if config.backend != "vllm":
        return build_engine(config), None
    set_nice(config.worker_nice, "worker")  # before any thread of its own starts
    if config.engine_cpus:
        avoid_cpus(config.engine_cpus, "worker")
    return (EngineProcess(build_engine, config, nice=config.engine_nice,
                          cpus=config.engine_cpus),
            ThreadPoolExecutor(1, "engine"))


def build_engine(config: WorkerConfig) -> Engine:
    if config.backend == "sim":
        return SimBackend(
            load_profile(config.profile),
            kv_blocks=config.kv_blocks,
            max_batch=config.max_batch,
            host_kv_blocks=config.host_kv_blocks,
        )
    if config.backend == "vllm":
        if config.vllm is None:
            raise ValueError("the vllm backend needs a model directory (--model)")
        from worker.vllm_backend import VllmBackend

        settings = config.vllm
        if config.kv_blocks is not None:
            settings = replace(settings, num_gpu_blocks=config.kv_blocks)
        if config.max_batch is not None:
            settings = replace(settings, max_num_seqs=config.max_batch)
        return VllmBackend(settings)
    raise ValueError(f"unknown backend {config.backend!r}; expected one of {', '.join(BACKENDS)}")


class WorkerService:
    """Owns the worker's tasks; :meth:`run` returns when stopped, raises if a task failed."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        engine: Engine | None = None,
        engine_thread: ThreadPoolExecutor | None = None,
        on_registered: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        # Before the engine starts (which can take minutes): bad TLS files fail at once.
        scheduler_credentials = config.scheduler_tls.load()
        if engine is None:
            engine, engine_thread = start_engine(config)
        self.engine = engine
        self.redis = Redis.from_url(config.redis_url, connection_class=HiredisPackedConnection)
        self.loop = WorkerLoop(
            self.engine,
            worker_id=config.worker_id,
            publisher=TokenPublisher(self.redis, interval_s=config.publish_interval_s),
            redis=self.redis,
            redis_prefix=config.redis_prefix,
            engine_thread=engine_thread,
            report_interval_s=config.report_interval_s,
        )
        self._announced = False
        self._on_registered = on_registered
        self.session = SchedulerSession(
            config.scheduler,
            registration=self.loop.registration,
            sync_report=self.loop.status_report,
            heartbeat_s=config.heartbeat_s,
            on_registered=self._registered,
            credentials=scheduler_credentials,
        )
        self.loop.attach(self.session)

    def _registered(self) -> None:
        if not self._announced:
            self._announced = True
            if self._on_registered is not None:
                self._on_registered()

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(self.session.run(), name="session"),
            asyncio.create_task(self.loop.run(), name="loop"),
        ]
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(stopper, *tasks)
            await self.redis.aclose()
        for task in tasks:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error
