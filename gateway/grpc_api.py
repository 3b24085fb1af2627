"""``andes.v1.GenerationService`` over gRPC: a thin adapter over :mod:`gateway.service`.

Generate validates the wire message (:mod:`gateway.validation`) and writes each
:class:`~gateway.service.Delta` as one ``GenerateResponse``; the generation service does the
rest. A :class:`~gateway.service.GenerationError` becomes the call's status. grpc.aio cancels
the handler when the client goes away or its deadline passes, which the service turns into an
Abort on the scheduler.
"""

from __future__ import annotations

import time
from typing import Any, NoReturn

import grpc

from andes.v1 import generation_pb2, generation_pb2_grpc
from gateway.service import Call, Delta, GenerationError, GenerationService
from gateway.validation import ValidationError, check_request_id, validate


class GrpcApi(generation_pb2_grpc.GenerationServiceServicer):
    """The servicer; :mod:`gateway.server` adds it to the gRPC server."""

    def __init__(self, service: GenerationService) -> None:
        self.service = service

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Any
    ) -> None:
        call = Call(deadline_s=_deadline(context))
        try:
            with self.service.admitted(call, _metadata(context)):
                valid = validate(request, self.service.limits)
                async with self.service.generation(call, valid) as generation:
                    async for delta in generation:
                        await context.write(_response(delta))
        except GenerationError as err:
            await _fail(context, err.code, err.message)

    async def Cancel(
        self, request: generation_pb2.CancelRequest, context: Any
    ) -> generation_pb2.CancelResponse:
        try:
            self.service.authorize(_metadata(context))
            found = await self.service.cancel(check_request_id(request.request_id))
        except ValidationError as err:
            await _fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except GenerationError as err:
            await _fail(context, err.code, err.message)
        return generation_pb2.CancelResponse(found=found)


def _response(delta: Delta) -> generation_pb2.GenerateResponse:
    response = generation_pb2.GenerateResponse(
        request_id=delta.request_id, index=delta.index, token_ids=delta.token_ids,
        text=delta.text, finish_reason=delta.finish_reason,  # type: ignore[arg-type]
    )
    if delta.finish_reason:
        response.usage.prompt_tokens = delta.prompt_tokens
        response.usage.completion_tokens = delta.completion_tokens
    return response


def _metadata(context: Any) -> list[tuple[str, str | bytes]]:
    return [(item[0], item[1]) for item in context.invocation_metadata() or ()]


def _deadline(context: Any) -> float | None:
    """The call's deadline on the monotonic clock (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _fail(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the RPC with ``code`` (``context.abort`` raises; this says so to the type checker)."""
    await context.abort(code, message)
    raise AssertionError("context.abort returned")
