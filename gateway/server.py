"""Assembly of a gateway: the generation service behind its gRPC and HTTP front ends, health,
reflection, and a graceful drain.

:class:`Gateway` owns every long-lived resource (Redis pool, scheduler channel, stream readers,
delivery stream, gRPC server, HTTP server) so that tests can run a real gateway in-process and
the ``__main__`` shell stays a few lines. Both servers run on the one asyncio loop and share one
:class:`~gateway.service.GenerationService`. Draining (SIGTERM) goes: refuse new streams with
UNAVAILABLE (HTTP 503) and report NOT_SERVING on ``grpc.health.v1`` and ``/healthz`` (load
balancers stop routing here), let the streams in progress finish for up to
``--drain-seconds``, then stop; streams still running at that point are cancelled, which aborts
their requests on the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from andes.redis_packing import HiredisPackedConnection
from andes.tls import TlsError, add_port
from andes.v1 import generation_pb2
from gateway.auth import ApiKeys
from gateway.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from gateway.config import GatewayConfig, split_host_port
from gateway.delivery import DeliveryReporter
from gateway.grpc_api import GrpcApi, server_options
from gateway.grpc_events import NotificationDrain, drain_grpc_notifications
from gateway.http_api import HttpApi
from gateway.metrics import GatewayMetrics
from gateway.payload import PayloadStore
from gateway.scheduler import SchedulerClient
from gateway.service import GenerationService
from gateway.streams import StreamHub
from gateway.tokens import ModelTokenizer

log = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name

SERVER_OPTIONS = [
    # Ping idle clients every minute so a vanished client's stream (and its KV cache on a
    # worker) is noticed and aborted; accept client pings every 10 s or more, idle or not.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    # The gateway's gRPC servers share its port (``--grpc-acceptors``); gRPC's own default
    # on Linux, stated because they depend on it.
    ("grpc.so_reuseport", 1),
]

PENDING_CALLS_MIN = 4096
"""The least room grpc-core's queue of calls not yet accepted by grpc.aio gets (see
:func:`pending_call_options`)."""

UNACCEPTED_CALL_WAIT_S = 600
"""How long a call may wait in that queue (grpc-core's default: 30 s)."""


def pending_call_options(max_streams: int) -> list[tuple[str, int]]:
    """Room in grpc-core's queue of calls that arrived but that grpc.aio has not accepted yet.

    grpc.aio accepts calls one at a time per server from the event loop (one ``request_call``
    in flight, which takes several turns of the loop to come back and be made again), so a
    burst of new streams queues in grpc-core until the loop gets to them: while the gateway
    streams on a shared CPU its turns are long, and it took 1,024 calls in at about 75 a
    second. Hence several servers share the port (``--grpc-acceptors``), each accepting on
    its share of the connections; and a call waits in the queue up to
    ``UNACCEPTED_CALL_WAIT_S`` (or its own deadline), not grpc-core's 30 s, after which it
    was dropped as a bare CANCELLED (seen with 1,024 calls at once on a slow host).

    grpc-core also guards that queue with random early drop: past
    ``grpc.server.max_pending_requests`` (default 1,000) it kills a new call with probability
    rising to 1 at ``grpc.server.max_pending_requests_hard_limit`` (default 3,000). A killed
    call never reaches the application: the client gets a bare CANCELLED and the gateway
    cannot log, count or answer it. That is what ended 7-66% of 2,000 streams opened at once.

    Both limits are set to one value, at least twice ``--max-streams``: a burst up to the
    gateway's own stream limit (and as many again beyond it) waits in the queue for the loop,
    and every call the gateway cannot serve reaches admission, which refuses it with
    RESOURCE_EXHAUSTED and a message. Only past that (a client opening more than twice the
    gateway's capacity in one go) does grpc-core's overload protection drop calls. Soft equal
    to hard: no random drops below the limit."""
    limit = max(PENDING_CALLS_MIN, 2 * max_streams)
    return [
        ("grpc.server.max_pending_requests", limit),
        ("grpc.server.max_pending_requests_hard_limit", limit),
        ("grpc.server_max_unrequested_time_in_server", UNACCEPTED_CALL_WAIT_S),
    ]


REDIS_STARTUP_S = 10.0

REDIS_CONNECTIONS = 256
"""Redis connections the gateway keeps at most (stream readers, payload writes)."""
REDIS_POOL_WAIT_S = 10.0
"""How long a caller waits for a free connection before the request fails."""

STREAMS_END_S = 1.0
"""After the servers stopped, how long cancelled streams get to end (each schedules its
request's Abort on the way out)."""


class StartupError(RuntimeError):
    """The gateway cannot start (Redis unreachable, bad key file, port taken)."""


class Gateway:
    """A runnable gateway; ``await start()``, then ``drain()`` or ``stop()``.

    ``chat_template`` renders the HTTP API's chat requests (see :mod:`gateway.chat`); with
    ``config.tokenizer`` the model's tokenizer counts prompt tokens and its chat template
    wins (:mod:`gateway.tokens`).
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        registry: CollectorRegistry | None = None,
        chat_template: ChatTemplate = DEFAULT_CHAT_TEMPLATE,
    ) -> None:
        self.config = config
        self.gateway_id = config.resolved_gateway_id()
        self.metrics = GatewayMetrics(registry)
        try:
            self._tokenizer = ModelTokenizer(config.tokenizer) if config.tokenizer else None
        except ValueError as err:
            raise StartupError(str(err)) from err
        try:
            # Read and checked here, so bad TLS files stop the start before anything connects.
            self._tls = config.tls.load()
            self._scheduler_tls = config.scheduler_tls.load()
        except TlsError as err:
            raise StartupError(str(err)) from err
        self.chat_template = self._tokenizer or chat_template
        self.address = ""
        self.http_address = ""
        """The HTTP API's bound ``host:port`` (empty while it is off)."""
        self._redis: aioredis.Redis | None = None
        self._servers: list[grpc.aio.Server] = []
        """The gRPC servers sharing the listen port (``config.grpc_acceptors``)."""
        self._http: HttpApi | None = None
        self._health: health.aio.HealthServicer | None = None
        self._service: GenerationService | None = None
        self._hub: StreamHub | None = None
        self._reporter: DeliveryReporter | None = None
        self._scheduler: SchedulerClient | None = None
        self._stopped = False
        self._drain: NotificationDrain | None = None

    @property
    def drains_grpc_notifications(self) -> bool:
        """Whether grpc.aio's completion events reach the loop unthrottled
        (:mod:`gateway.grpc_events`)."""
        return self._drain is not None and not self._drain.closed

    @property
    def service(self) -> GenerationService:
        """The generation service both front ends share (streams in progress, draining)."""
        if self._service is None:
            raise RuntimeError("the gateway has not started")
        return self._service

    async def start(self) -> str:
        """Connect, bind and serve; returns the bound gRPC ``host:port`` (the HTTP API's is
        :attr:`http_address`). Raises StartupError."""
        config = self.config
        try:
            api_keys = ApiKeys.load(config.api_keys_file) if config.api_keys_file else None
        except (OSError, ValueError) as err:
            raise StartupError(f"API keys file: {err}") from err
        # A blocking pool: with thousands of streams, callers wait for a free connection
        # rather than failing with "Too many connections" (the default pool's behaviour).
        pool = aioredis.BlockingConnectionPool.from_url(
            config.redis_url, max_connections=REDIS_CONNECTIONS, timeout=REDIS_POOL_WAIT_S,
            connection_class=HiredisPackedConnection,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        await self._wait_for_redis(self._redis)
        self._scheduler = SchedulerClient(config.scheduler, self._scheduler_tls)
        self._reporter = DeliveryReporter(
            self._scheduler, self.gateway_id, interval_s=config.report_interval_s
        )
        self._hub = StreamHub(self._redis, f"{config.redis_prefix}:gateway:{self.gateway_id}:wake")
        self._service = GenerationService(
            limits=config.limits,
            payloads=PayloadStore(self._redis, config.redis_prefix, self.gateway_id),
            hub=self._hub,
            scheduler=self._scheduler,
            reporter=self._reporter,
            metrics=self.metrics,
            gateway_id=self.gateway_id,
            api_keys=api_keys,
            max_streams=config.max_streams,
            submit_timeout_s=config.submit_timeout_s,
            prompt_counter=self._tokenizer,
            key_limits=config.key_limits,
            stalled_client_timeout_s=config.stalled_client_timeout_s,
        )
        self._health = health.aio.HealthServicer()
        api = GrpcApi(self._service)
        host = config.listen.rpartition(":")[0] or "127.0.0.1"
        listen = config.listen
        for _ in range(config.grpc_acceptors):
            # The first binds the configured port (maybe 0: any), the others the same one.
            server = self._grpc_server(api)
            try:
                port = add_port(server, listen, self._tls)
            except RuntimeError as err:
                raise StartupError(f"cannot listen on {listen}: {err}") from err
            if port == 0:
                raise StartupError(f"cannot listen on {listen}")
            self._servers.append(server)
            listen = f"{host}:{port}"
        for server in self._servers:
            await server.start()
        self._drain = drain_grpc_notifications()
        if config.http_listen:
            await self._start_http(self._service)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._reporter.start()
        if config.metrics_port:
            self.metrics.serve(config.metrics_port, host.strip("[]"))
        self.address = f"{host}:{port}"
        log.info("gateway %s serving on %s, HTTP %s (scheduler %s)", self.gateway_id,
                 self.address, self.http_address or "off", config.scheduler)
        return self.address

    def _grpc_server(self, api: GrpcApi) -> grpc.aio.Server:
        """One of the gRPC servers sharing the listen port (``SO_REUSEPORT``: the kernel
        spreads the client connections over them), each with every service."""
        config = self.config
        assert self._health is not None
        server = grpc.aio.server(options=[
            *SERVER_OPTIONS, *server_options(config.limits),
            *pending_call_options(config.max_streams),
        ])
        api.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    async def _start_http(self, service: GenerationService) -> None:
        config = self.config
        self._http = HttpApi(service, self.metrics, model=config.served_model_name,
                             chat_template=self.chat_template)
        try:
            host, port = split_host_port(config.http_listen)
            self.http_address = await self._http.start(
                host, port, ssl_context=self._tls.ssl_context if self._tls else None
            )
        except (OSError, ValueError) as err:
            raise StartupError(f"cannot listen on {config.http_listen}: {err}") from err

    async def begin_drain(self) -> None:
        """Stop admitting streams and report NOT_SERVING (and /healthz 503); streams in
        progress go on."""
        self.service.start_draining()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()

    async def wait_idle(self, timeout_s: float) -> bool:
        return await self.service.wait_idle(timeout_s)

    async def drain(self, seconds: float) -> None:
        """The SIGTERM path: begin draining, wait up to ``seconds`` for streams, stop."""
        await self.begin_drain()
        if not await self.wait_idle(seconds):
            log.warning("drain: %d streams still running after %.1f s; cancelling them",
                        self.service.active_streams, seconds)
        await self.stop()

    async def stop(self, grace_s: float = 0.5) -> None:
        """Stop serving (cancelling streams left), abort their requests, release everything."""
        if self._stopped:
            return
        self._stopped = True
        servers: list[Awaitable[None]] = [server.stop(grace_s) for server in self._servers]
        if self._http is not None:
            servers.append(self._http.stop())
        await asyncio.gather(*servers)
        if self._service is not None:
            await self._service.wait_idle(STREAMS_END_S)
            await self._service.flush_background()
        if self._reporter is not None:
            await self._reporter.close()
        if self._hub is not None:
            await self._hub.close()
        if self._scheduler is not None:
            await self._scheduler.close()
        if self._redis is not None:
            await self._redis.aclose()
        if self._drain is not None:
            self._drain.close()
        self.metrics.stop_serving()

    async def wait_for_termination(self) -> None:
        await asyncio.gather(*(server.wait_for_termination() for server in self._servers))

    async def _wait_for_redis(self, client: aioredis.Redis) -> None:
        deadline = time.monotonic() + REDIS_STARTUP_S
        while True:
            try:
                await client.ping()
                return
            except (RedisError, OSError) as err:
                if time.monotonic() >= deadline:
                    with contextlib.suppress(RedisError, OSError):
                        await client.aclose()
                    raise StartupError(f"Redis at {self.config.redis_url} unreachable: {err}") \
                        from err
                await asyncio.sleep(0.2)
