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
from dataclasses import dataclass
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


STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

MAX_SUBMIT_BATCH = 512
"""Requests per SubmitBatch call at most (a call of 512 is about 100 KB)."""


@dataclass
class _Submission:
    message: scheduler_pb2.SubmitRequest
    timeout_s: float
    result: asyncio.Future[str]


class SchedulerClient:
    """Submit / Abort / ReportDelivery on ``target`` (host:port), over TLS when given
    ``credentials``."""

    def __init__(self, target: str, credentials: ChannelCredentials | None = None) -> None:
        self.target = target
        self._channel = aio_channel(target, credentials)
        self._stub: Any = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._submissions: list[_Submission] = []
        """Waiting for the SubmitBatch call under way to return."""
        self._sender: asyncio.Task[None] | None = None

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
        submission = _Submission(message, timeout_s, asyncio.get_running_loop().create_future())
        # Its answer may come after its caller stopped waiting: nobody else would read it.
        submission.result.add_done_callback(_retrieved)
        self._submissions.append(submission)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_submissions())
        try:
            # Shielded: a caller that leaves (its client went away) leaves the batch alone.
            return await asyncio.wait_for(asyncio.shield(submission.result), timeout_s)
        except TimeoutError:
            raise SchedulerError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"scheduler Submit failed: no answer within {timeout_s:g} s"
                                 ) from None

    async def _send_submissions(self) -> None:
        """Send what waits, a batch at a time, until nothing does."""
        try:
            while self._submissions:
                batch = self._submissions[:MAX_SUBMIT_BATCH]
                del self._submissions[:MAX_SUBMIT_BATCH]
                await self._send_batch(batch)
        except BaseException:  # cancelled (the gateway stops): nobody will send the rest
            for submission in self._submissions:
                submission.result.cancel()
            self._submissions.clear()
            raise
        finally:
            self._sender = None

    async def _send_batch(self, batch: list[_Submission]) -> None:
        request = scheduler_pb2.SubmitBatchRequest(requests=[s.message for s in batch])
        try:
            response: scheduler_pb2.SubmitBatchResponse = await self._stub.SubmitBatch(
                request, timeout=max(s.timeout_s for s in batch))
        except grpc.aio.AioRpcError as err:
            failure = _client_error(err, "Submit")
            for submission in batch:
                _settle(submission.result, error=failure)
            return
        except Exception as err:  # not the call's status: a closed channel, say
            failure = SchedulerError(grpc.StatusCode.INTERNAL, f"scheduler Submit failed: {err!r}")
            for submission in batch:
                _settle(submission.result, error=failure)
            return
        except BaseException:
            for submission in batch:  # the gateway is stopping: nobody waits for them
                submission.result.cancel()
            raise
        if len(response.results) != len(batch):
            failure = SchedulerError(grpc.StatusCode.INTERNAL, "scheduler Submit failed: "
                                     f"{len(response.results)} results for {len(batch)} requests")
            for submission in batch:
                _settle(submission.result, error=failure)
            return
        for submission, result in zip(batch, response.results, strict=True):
            if result.code:
                code = STATUS_BY_NUMBER.get(result.code, grpc.StatusCode.UNKNOWN)
                _settle(submission.result, error=SchedulerError(
                    code if code in PASSED_THROUGH else grpc.StatusCode.INTERNAL,
                    f"scheduler Submit failed: {result.message or code.name}"))
            else:
                _settle(submission.result, worker_id=result.worker_id)

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


def _retrieved(result: asyncio.Future[str]) -> None:
    if not result.cancelled():
        result.exception()


def _settle(result: asyncio.Future[str], *, worker_id: str = "",
            error: SchedulerError | None = None) -> None:
    """Answer a submission whose caller may have stopped waiting (its future is then done)."""
    if result.done():
        return
    if error is not None:
        result.set_exception(error)
    else:
        result.set_result(worker_id)
