"""The gateway's client of the scheduler service: Submit, Abort and the delivery stream.

Keeps one channel (gRPC multiplexes every call over it) and turns the scheduler's errors into
the status the gateway's own client should see: the scheduler's code passes through when it
means something to the client (overloaded, no worker, duplicate id, deadline), anything else
becomes INTERNAL, because the client cannot act on the scheduler's internals.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from andes.tls import ChannelCredentials, aio_channel
from andes.v1 import generation_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

PASSED_THROUGH = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
})

ABORT_TIMEOUT_S = 5.0


class SchedulerError(Exception):
    """A failed scheduler call, with the status to report to the gateway's client."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def _client_error(err: grpc.aio.AioRpcError, what: str) -> SchedulerError:
    code = err.code()
    details = f"scheduler {what} failed: {err.details() or code.name}"
    return SchedulerError(code if code in PASSED_THROUGH else grpc.StatusCode.INTERNAL, details)


class SchedulerClient:
    """Submit / Abort / ReportDelivery on ``target`` (host:port), over TLS when given
    ``credentials``."""

    def __init__(self, target: str, credentials: ChannelCredentials | None = None) -> None:
        self.target = target
        self._channel = aio_channel(target, credentials)
        self._stub: Any = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def submit(
        self,
        *,
        request_id: str,
        gateway_id: str,
        prompt_tokens: int,
        max_tokens: int,
        qoe: generation_pb2.QoESpec,
        sampling: generation_pb2.SamplingParams,
        arrival_unix_s: float,
        payload_key: str,
        token_stream_key: str,
        timeout_s: float,
    ) -> str:
        """Hand the request over; returns its worker. Raises :class:`SchedulerError`."""
        message = scheduler_pb2.SubmitRequest(
            request_id=request_id,
            gateway_id=gateway_id,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            qoe=qoe,
            sampling=sampling,
            arrival_unix_s=arrival_unix_s,
            payload_key=payload_key,
            token_stream_key=token_stream_key,
        )
        try:
            response: scheduler_pb2.SubmitResponse = await self._stub.Submit(
                message, timeout=timeout_s
            )
        except grpc.aio.AioRpcError as err:
            raise _client_error(err, "Submit") from err
        return response.worker_id

    async def abort(self, request_id: str, reason: str) -> bool:
        """Stop the request on its worker; True if the scheduler knew it. Idempotent, so a
        retry or a second abort for the same id is harmless. Raises :class:`SchedulerError`."""
        try:
            response: scheduler_pb2.AbortResponse = await self._stub.Abort(
                scheduler_pb2.AbortRequest(request_id=request_id, reason=reason),
                timeout=ABORT_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as err:
            raise _client_error(err, "Abort") from err
        return response.found

    def report_delivery(self) -> Any:
        """A new client-streaming ReportDelivery call (``write`` / ``done_writing``)."""
        return self._stub.ReportDelivery()

    async def close(self) -> None:
        await self._channel.close()
