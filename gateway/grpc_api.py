"""``andes.v1.GenerationService`` over gRPC: a thin adapter over :mod:`gateway.service`.

Generate validates the wire message (:mod:`gateway.validation`) and writes each
:class:`~gateway.service.Delta` as one ``GenerateResponse``; the generation service does the
rest. A :class:`~gateway.service.GenerationError` becomes the call's status. grpc.aio cancels
the handler when the client goes away or its deadline passes, which the service turns into an
Abort on the scheduler.

Requests are decoded here too (:meth:`GrpcApi.add_to_server`), not by grpc.aio's stock
deserializer: bytes that are no valid message (a corrupt wire format, a string field that is not
UTF-8) are the client's fault and get INVALID_ARGUMENT naming the field where it can be found,
where grpc.aio would answer UNKNOWN, a server error. The largest message accepted follows the
prompt limits (:func:`max_request_bytes`): a bigger one is RESOURCE_EXHAUSTED before it is
parsed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from andes.v1 import generation_pb2, generation_pb2_grpc
from gateway.ratelimit import retry_after_seconds
from gateway.service import Call, Delta, GenerationError, GenerationService
from gateway.validation import Limits, ValidationError, check_request_id, validate

M = TypeVar("M", bound=Message)

OTHER_FIELDS_BYTES = 2**16
"""Room in a request message for everything but the prompt: the request id, at most
MAX_STOP_STRINGS stop strings, the numbers and the framing take a few KiB at most."""


def max_request_bytes(limits: Limits) -> int:
    """The largest serialized request the gRPC server reads: the longest prompt the limits
    allow, as UTF-8 text (up to 4 bytes a character) or as token ids (up to 5 bytes each),
    plus :data:`OTHER_FIELDS_BYTES`. Anything bigger cannot be valid, so it is refused before
    the gateway spends memory and time on it."""
    return 4 * limits.max_prompt_chars + 5 * limits.max_prompt_tokens + OTHER_FIELDS_BYTES


def server_options(limits: Limits) -> list[tuple[str, int]]:
    """gRPC server options that bound what a client can make the gateway read."""
    return [("grpc.max_receive_message_length", max_request_bytes(limits))]


class Undecodable:
    """What the decoder hands the servicer for bytes that are no valid message: the
    servicer raises ``error`` inside its admission block, so it is counted and answered as
    any other invalid request."""

    def __init__(self, error: ValidationError) -> None:
        self.error = error


def decoder(message_type: type[M]) -> Callable[[bytes], M | Undecodable]:
    """A request deserializer that never raises: see :class:`Undecodable`."""

    def decode(raw: bytes) -> M | Undecodable:
        message: M = message_type()
        try:
            message.ParseFromString(raw)
        except DecodeError as err:
            descriptor = message_type.DESCRIPTOR
            field = _non_utf8_field(raw, descriptor)
            if field is not None:
                return Undecodable(ValidationError(field, "not valid UTF-8 text"))
            # upb says "Error parsing message with type 'T': <what>": keep the what.
            what = str(err).rpartition("': ")[2]
            return Undecodable(ValidationError(
                "request", f"not a valid {descriptor.full_name} message ({what})"
            ))
        return message

    return decode


def decoded(request: M | Undecodable) -> M:
    """``request`` if it was decoded; else its :class:`ValidationError`."""
    if isinstance(request, Undecodable):
        raise request.error
    return request


class GrpcApi(generation_pb2_grpc.GenerationServiceServicer):
    """The servicer; :mod:`gateway.server` adds it to the gRPC server."""

    def __init__(self, service: GenerationService) -> None:
        self.service = service

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve ``andes.v1.GenerationService`` on ``server``: what the generated
        ``add_GenerationServiceServicer_to_server`` does, with :func:`decoder` s, and as
        generic handlers only. grpc.aio accepts new calls on the event loop that also streams
        every response, one call per turn of it, and with the methods registered too
        (grpc 1.85) it accepted a burst's calls more slowly: 1,024 calls at once while the
        gateway streamed (the tiny model on the 2-core machine, a scratch counter in
        Generate) reached their handler after 8.6, 12.5 and 15.5 s as generic handlers only,
        against 13.6, 19.8 and 18.4 s registered too, run by run."""
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate,
                request_deserializer=decoder(generation_pb2.GenerateRequest),
                response_serializer=generation_pb2.GenerateResponse.SerializeToString,
            ),
            "Cancel": grpc.unary_unary_rpc_method_handler(
                self.Cancel,
                request_deserializer=decoder(generation_pb2.CancelRequest),
                response_serializer=generation_pb2.CancelResponse.SerializeToString,
            ),
        }
        name = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))

    async def Generate(
        self, request: generation_pb2.GenerateRequest | Undecodable, context: Any
    ) -> None:
        call = Call(deadline_s=_deadline(context))
        try:
            with self.service.admitted(call, _metadata(context)):
                valid = validate(decoded(request), self.service.limits)
                async with self.service.generation(call, valid) as generation:
                    async for delta in generation:
                        async with self.service.sending():
                            await _write(context, _response(delta))
        except GenerationError as err:
            await _fail(context, err.code, err.message, _retry_after(err))
        except ConnectionResetError:
            pass  # the client left mid-write: there is nobody to answer

    async def Cancel(
        self, request: generation_pb2.CancelRequest | Undecodable, context: Any
    ) -> generation_pb2.CancelResponse:
        try:
            self.service.authorize(_metadata(context))
            found = await self.service.cancel(check_request_id(decoded(request).request_id))
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


async def _write(context: Any, response: generation_pb2.GenerateResponse) -> None:
    """``context.write``, where a failed write is ConnectionResetError: the stream is gone
    (grpc.aio fails a write pending when the client leaves, a stalled client's for instance,
    before it cancels the handler), so the request counts as disconnected, as on HTTP."""
    try:
        await context.write(response)
    except Exception as err:  # grpc.aio's internal ExecuteBatchError
        raise ConnectionResetError(f"the stream broke while writing: {err}") from err


def _metadata(context: Any) -> list[tuple[str, str | bytes]]:
    return [(item[0], item[1]) for item in context.invocation_metadata() or ()]


def _deadline(context: Any) -> float | None:
    """The call's deadline on the monotonic clock (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _fail(context: Any, code: grpc.StatusCode, message: str,
                trailers: tuple[tuple[str, str], ...] = ()) -> NoReturn:
    """End the RPC with ``code`` (``context.abort`` raises; this says so to the type checker)."""
    await context.abort(code, message, trailers)
    raise AssertionError("context.abort returned")


def _retry_after(err: GenerationError) -> tuple[tuple[str, str], ...]:
    """A ``retry-after`` trailer (whole seconds, as HTTP's header) for a rate-limited call."""
    if err.retry_after_s is None:
        return ()
    return (("retry-after", str(retry_after_seconds(err.retry_after_s))),)


def _non_utf8_field(raw: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The name of the first string field of ``raw`` that is not UTF-8 (``sampling.stop[2]``),
    None if there is none or the wire format itself is broken. Runs only on bytes the parser
    refused, to say which field was at fault."""
    try:
        return _walk(raw, descriptor, prefix)
    except (IndexError, ValueError):  # truncated or corrupt framing
        return None


def _walk(raw: bytes, descriptor: Descriptor, prefix: str) -> str | None:
    """:func:`_non_utf8_field` over one message's fields (and its message fields')."""
    position = 0
    seen: dict[int, int] = {}  # occurrences so far of each repeated field, to name one
    while position < len(raw):
        key, position = _varint(raw, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = _varint(raw, position)
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            size, position = _varint(raw, position)
            value, position = raw[position:position + size], position + size
            if position > len(raw):
                return None
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            name = f"{prefix}{field.name}"
            if field.is_repeated:
                seen[number] = seen.get(number, -1) + 1
                name += f"[{seen[number]}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    value.decode()
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = _walk(value, field.message_type, name + ".")
                if found is not None:
                    return found
        else:  # groups (no field of these messages is one) or an invalid wire type
            return None
    return None


def _varint(raw: bytes, position: int) -> tuple[int, int]:
    """The base-128 varint at ``position`` and the position after it."""
    value = shift = 0
    while True:
        byte = raw[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")
