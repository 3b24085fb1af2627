"""The scheduler's gRPC face: ``andes.v1.SchedulerService``, health and reflection.

A thin transport layer over :class:`scheduler_service.scheduler.Scheduler`: it decodes, calls
the matching handler, and turns :class:`RejectedError` into a gRPC status. A worker session is a
bidirectional stream: the handler reads the registration, acknowledges it with the
``andes-session`` initial-metadata key (the worker's proof that it is registered), then reads
reports in a task while writing the session's outbox, until either side ends it.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from andes.tls import ServerCredentials, add_port
from andes.v1 import scheduler_pb2, scheduler_pb2_grpc
from gateway.grpc_events import NotificationDrain, drain_grpc_notifications
from scheduler_service.metrics import SUBMIT_BATCH_SIZE
from scheduler_service.scheduler import RejectedError, Scheduler, WorkerSessionHandle

log = logging.getLogger(__name__)

SESSION_METADATA_KEY = "andes-session"
"""Initial-metadata key acknowledging a worker's registration (the worker waits for it)."""
SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name

PENDING_CALLS = 16384
"""Room in grpc-core's queue of calls grpc.aio has not accepted yet. grpc.aio accepts one call
at a time from the event loop; past grpc-core's defaults (random drops from 1,000 waiting calls,
all from 3,000) a burst of Submits from gateways (each holds up to ``--max-streams`` 4,096
streams) would lose calls as a bare CANCELLED that the scheduler never sees. The same guard as
the gateway's (:func:`gateway.server.pending_call_options`)."""
SERVER_OPTIONS = [
    ("grpc.server.max_pending_requests", PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
]


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    async def Submit(
        self, request: scheduler_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitResponse:
        try:
            worker_id = self._scheduler.submit(request)
        except RejectedError as err:
            await context.abort(err.code, err.message)
        return scheduler_pb2.SubmitResponse(worker_id=worker_id)

    async def SubmitBatch(
        self, request: scheduler_pb2.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitBatchResponse:
        SUBMIT_BATCH_SIZE.observe(len(request.requests))
        results = []
        for item in request.requests:
            try:
                results.append(scheduler_pb2.SubmitResult(
                    worker_id=self._scheduler.submit(item)))
            except RejectedError as err:
                results.append(scheduler_pb2.SubmitResult(
                    code=err.code.value[0], message=err.message))
        return scheduler_pb2.SubmitBatchResponse(results=results)

    async def Abort(
        self, request: scheduler_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.AbortResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        found = self._scheduler.abort(request.request_id)
        if found:
            log.info("request %s aborted: %s", request.request_id, request.reason or "-")
        return scheduler_pb2.AbortResponse(found=found)

    async def ReportDelivery(
        self, request_iterator: object, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ReportDeliveryResponse:
        received = 0
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                break
            received += self._scheduler.report_delivery(message)
        return scheduler_pb2.ReportDeliveryResponse(entries_received=received)

    async def WorkerSession(
        self, request_iterator: object, context: grpc.aio.ServicerContext
    ) -> None:
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("message") != "registration":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a worker session starts with a registration"
            )
        try:
            handle = self._scheduler.open_session(first.registration)
        except RejectedError as err:
            await context.abort(err.code, err.message)
        try:
            await context.send_initial_metadata(
                ((SESSION_METADATA_KEY, str(handle.session_id)),)
            )
            reader = asyncio.create_task(self._read(context, handle))
            try:
                while True:
                    message = await handle.next_message()
                    if message is None:
                        break
                    await context.write(message)
            finally:
                reader.cancel()
                await asyncio.wait([reader])
        finally:
            self._scheduler.close_session(handle)

    async def _read(self, context: grpc.aio.ServicerContext, handle: WorkerSessionHandle) -> None:
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    return
                self._scheduler.on_message(handle, message)
        except grpc.RpcError as err:
            log.info("worker %s session broke: %s", handle.worker_id, err)
        finally:
            handle.close()


class SchedulerServer:
    """The gRPC server around a scheduler: start, address, graceful stop. With
    ``credentials`` it serves TLS only (and, with a client CA, only to clients it signed)."""

    def __init__(self, scheduler: Scheduler, listen: str = "127.0.0.1:50052",
                 credentials: ServerCredentials | None = None) -> None:
        self.scheduler = scheduler
        self.listen = listen
        self.credentials = credentials
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        self.health = health_aio.HealthServicer()
        self.port = 0
        self._drain: NotificationDrain | None = None

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(  # type: ignore[no-untyped-call]
            SchedulerServicer(self.scheduler), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        self.port = add_port(self.server, self.listen, self.credentials)
        await self.scheduler.start()
        await self.server.start()
        # grpc.aio's completion events unthrottled: a burst of Submits and the reports of
        # every worker and gateway must not queue at one event per loop iteration.
        self._drain = drain_grpc_notifications()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop taking requests, end worker sessions, let in-flight calls finish."""
        await self.health.enter_graceful_shutdown()
        await self.scheduler.stop()
        await self.server.stop(grace_s)
        if self._drain is not None:
            self._drain.close()
