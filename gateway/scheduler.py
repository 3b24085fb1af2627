"""The gateway's client of the scheduler service: submissions, Abort and the delivery stream.

Keeps one channel (gRPC multiplexes every call over it) and turns the scheduler's errors into
the status the gateway's own client should see: the scheduler's code passes through when it
means something to the client (overloaded, no worker, duplicate id, deadline), anything else
becomes INTERNAL, because the client cannot act on the scheduler's internals.

Submissions travel in batches (``SubmitBatch``): one call is in flight at a time, and the
requests submitted meanwhile leave together when it returns. A lone request goes at once; a
burst of arrivals costs the gateway and the scheduler one call per round trip instead of one
per request (a unary call costs the scheduler more CPU than placing the request does).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from andes.tls import ChannelCredentials, aio_channel
from andes.v1 import generation_pb2, scheduler_pb2, scheduler_pb2_grpc
from gateway.batching import InFlightBatches

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


STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

MAX_SUBMIT_BATCH = 512
"""Requests per SubmitBatch call at most (a call of 512 is about 100 KB)."""


class SchedulerClient:
    """Submit / Abort / ReportDelivery on ``target`` (host:port), over TLS when given
    ``credentials``."""

    def __init__(self, target: str, credentials: ChannelCredentials | None = None) -> None:
        self.target = target
        self._channel = aio_channel(target, credentials)
        self._stub: Any = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._submissions: InFlightBatches[tuple[scheduler_pb2.SubmitRequest, float]] = (
            InFlightBatches(self._submit_batch, MAX_SUBMIT_BATCH))

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
        """Hand the request over; returns its worker. Raises :class:`SchedulerError`
        (DEADLINE_EXCEEDED once ``timeout_s`` passed, whether or not it was placed)."""
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
        result = self._submissions.enqueue((message, timeout_s))
        try:
            # Shielded: a caller that leaves (its client went away) leaves the batch alone.
            worker_id: str = await asyncio.wait_for(asyncio.shield(result), timeout_s)
        except TimeoutError:
            raise SchedulerError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"scheduler Submit failed: no answer within {timeout_s:g} s"
                                 ) from None
        return worker_id

    async def _submit_batch(
        self, batch: list[tuple[scheduler_pb2.SubmitRequest, float]]
    ) -> list[str | SchedulerError]:
        """One SubmitBatch call: each request's worker or the error its caller gets."""
        request = scheduler_pb2.SubmitBatchRequest(requests=[message for message, _ in batch])
        try:
            response: scheduler_pb2.SubmitBatchResponse = await self._stub.SubmitBatch(
                request, timeout=max(timeout_s for _, timeout_s in batch))
        except grpc.aio.AioRpcError as err:
            return [_client_error(err, "Submit")] * len(batch)
        except Exception as err:  # not the call's status: a closed channel, say
            return [SchedulerError(grpc.StatusCode.INTERNAL,
                                   f"scheduler Submit failed: {err!r}")] * len(batch)
        if len(response.results) != len(batch):
            return [SchedulerError(grpc.StatusCode.INTERNAL, "scheduler Submit failed: "
                                   f"{len(response.results)} results for {len(batch)} requests"
                                   )] * len(batch)
        return [_submit_result(result) for result in response.results]

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


def _submit_result(result: scheduler_pb2.SubmitResult) -> str | SchedulerError:
    if not result.code:
        return result.worker_id
    code = STATUS_BY_NUMBER.get(result.code, grpc.StatusCode.UNKNOWN)
    return SchedulerError(code if code in PASSED_THROUGH else grpc.StatusCode.INTERNAL,
                          f"scheduler Submit failed: {result.message or code.name}")
