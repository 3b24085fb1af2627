"""The OpenAI-compatible HTTP/SSE API, served by the gateway process beside gRPC.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (server-sent events with
``"stream": true``, one JSON answer otherwise), ``GET /v1/models``, ``GET /healthz`` (503 while
draining) and ``GET /metrics`` (the gateway's Prometheus registry).

A completion is a thin adapter over :mod:`gateway.service`, exactly like a gRPC Generate: the
same admission (API keys, draining, the stream limit), validation (:mod:`gateway.openai_request`
feeds :func:`gateway.validation.validate`), submission, token stream and delivery reports. Each
:class:`~gateway.service.Delta` becomes one SSE chunk, written before the next delta is asked
for, so the moment a chunk is written is its tokens' delivery time for the QoE pacer and the
scheduler. A non-streaming answer asks for the whole response at once: its tokens count as
delivered when the answer is written.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; the gateway's
statuses map to HTTP as google.rpc's codes do (INVALID_ARGUMENT 400, UNAUTHENTICATED 401,
ALREADY_EXISTS 409, RESOURCE_EXHAUSTED 429 (``Retry-After`` when a key's rate limit refused it),
CANCELLED 499, UNAVAILABLE 503, other 500). Once a stream has begun, an error is a last
``data: {"error": ...}`` event followed by ``data: [DONE]``.
The server runs with handler cancellation: a client that goes away cancels its handler, which
aborts the request on the scheduler, as a dropped gRPC stream does.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from andes.v1 import generation_pb2
from gateway.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from gateway.config import join_host_port
from gateway.metrics import GatewayMetrics
from gateway.openai_request import OpenAIRequest, parse_chat, parse_completion
from gateway.ratelimit import retry_after_seconds
from gateway.service import Call, Delta, GenerationError, GenerationService
from gateway.validation import Limits

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CALL = web.RequestKey("andes_call", Call)
"""A completion's :class:`Call`, for the metrics middleware to read its outcome."""

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""google.rpc's HTTP mapping of the statuses the gateway raises; any other one is a 500."""

OUTCOME_BY_STATUS = {400: "invalid", 401: "unauthenticated", 404: "not_found",
                     405: "not_found", 499: "disconnected", 503: "unavailable"}
"""The outcome label of a request to an endpoint other than the completions."""

FINISH_REASONS: dict[int, str] = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
}
"""The finish reasons OpenAI knows; CANCELLED and ERROR end a response with an error."""

SHUTDOWN_S = 0.5
"""On stop, how long open responses may take to finish before they are cancelled (the drain
has already waited for them)."""


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; ``type`` follows the HTTP status."""
    if status == 401:
        kind = "authentication_error"
    elif status == 429:
        kind = "rate_limit_error"
    elif status == 499:
        kind = "cancelled"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_response(err: GenerationError) -> web.Response:
    status = HTTP_STATUS.get(err.code, 500)
    headers = None
    if err.retry_after_s is not None:  # a per-key rate limit: when a retry will be admitted
        headers = {"Retry-After": str(retry_after_seconds(err.retry_after_s))}
    return _json(error_body(err.message, status, err.param), status, headers)


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None,
          ) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class _Endpoint:
    """What differs between ``/v1/completions`` and ``/v1/chat/completions``."""

    chat: bool

    @property
    def id_prefix(self) -> str:
        return "chatcmpl-" if self.chat else "cmpl-"

    @property
    def whole_object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def parse(self, body: dict[str, Any], headers: Mapping[str, str], limits: Limits,
              template: ChatTemplate) -> OpenAIRequest:
        if self.chat:
            return parse_chat(body, headers, limits, template)
        return parse_completion(body, headers, limits)

    def chunk_choice(self, text: str, finish: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def whole_choice(self, text: str, finish: str) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


COMPLETIONS = _Endpoint(chat=False)
CHAT = _Endpoint(chat=True)


def _usage(delta: Delta) -> dict[str, int]:
    return {"prompt_tokens": delta.prompt_tokens, "completion_tokens": delta.completion_tokens,
            "total_tokens": delta.prompt_tokens + delta.completion_tokens}


class _Reply:
    """How one completion goes back to its client (subclasses: streamed or whole)."""

    def __init__(self, request: web.Request, endpoint: _Endpoint, parsed: OpenAIRequest,
                 call: Call, model: str) -> None:
        self.request = request
        self.endpoint = endpoint
        self.parsed = parsed
        self.model = model
        self.id = endpoint.id_prefix + parsed.valid.request_id
        self.created = int(call.arrival_unix_s)
        self.headers = {"X-Request-Id": parsed.valid.request_id}
        self.response: web.StreamResponse | None = None
        """Set when the answer starts going out: errors then go into the stream."""
        self._cancelled = False
        self._usage: dict[str, int] | None = None
        """The token counts, from the last delta."""

    async def open(self) -> None:
        """The request was submitted."""

    async def write(self, delta: Delta) -> None:
        if delta.finish_reason:
            self._usage = _usage(delta)
        if delta.finish_reason == generation_pb2.FINISH_REASON_CANCELLED:
            self._cancelled = True

    async def close(self) -> None:
        """The response has ended: a cancelled one is an error."""
        if self._cancelled:
            raise GenerationError(grpc.StatusCode.CANCELLED, "the request was cancelled")

    async def fail(self, err: GenerationError) -> None:
        """Report ``err`` after :attr:`response` was sent (streams only)."""

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


class _EventStream(_Reply):
    """Server-sent events: ``data: {chunk}`` per delta, then ``data: [DONE]``."""

    async def open(self) -> None:
        self.response = web.StreamResponse(headers={
            **self.headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        })
        await self.response.prepare(self.request)
        if self.endpoint.chat:
            await self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}])

    async def write(self, delta: Delta) -> None:
        await super().write(delta)
        finish = FINISH_REASONS.get(delta.finish_reason)
        if delta.text or finish:
            await self._chunk([self.endpoint.chunk_choice(delta.text, finish)])

    async def close(self) -> None:
        await super().close()
        if self.parsed.include_usage:
            await self._send({**self._head(self.endpoint.chunk_object), "choices": [],
                              "usage": self._usage})
        await self._data("[DONE]")

    async def fail(self, err: GenerationError) -> None:
        try:
            await self._send(error_body(err.message, HTTP_STATUS.get(err.code, 500), err.param))
            await self._data("[DONE]")
        except ConnectionResetError:
            log.debug("%s: the client left before its error event", self.id)

    async def _chunk(self, choices: list[dict[str, Any]]) -> None:
        chunk = {**self._head(self.endpoint.chunk_object), "choices": choices}
        if self.parsed.include_usage:
            chunk["usage"] = None
        await self._send(chunk)

    async def _send(self, value: dict[str, Any]) -> None:
        await self._data(_dumps(value))

    async def _data(self, data: str) -> None:
        assert self.response is not None
        await self.response.write(f"data: {data}\n\n".encode())


class _Answer(_Reply):
    """One JSON answer, written as soon as the whole response is there."""

    async def write(self, delta: Delta) -> None:
        await super().write(delta)
        finish = FINISH_REASONS.get(delta.finish_reason)
        if finish is None:
            return
        body = {**self._head(self.endpoint.whole_object),
                "choices": [self.endpoint.whole_choice(delta.text, finish)],
                "usage": self._usage}
        self.response = _json(body, headers=self.headers)
        await self.response.prepare(self.request)
        await self.response.write_eof()


class HttpApi:
    """The aiohttp application and its server; :mod:`gateway.server` starts and stops it."""

    def __init__(
        self,
        service: GenerationService,
        metrics: GatewayMetrics,
        *,
        model: str,
        chat_template: ChatTemplate = DEFAULT_CHAT_TEMPLATE,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.model = model
        self.chat_template = chat_template
        self.created = int(time.time())
        self.address = ""
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._observe],
                              client_max_size=body_limit(self.service.limits))
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> str:
        """Serve on ``host:port`` (port 0: any free one), HTTPS with ``ssl_context``; the bound
        address. Raises OSError when the address is taken."""
        # handler_cancellation: a client that disconnects cancels its handler, which aborts
        # its request (the default lets a stream run on until its next write fails).
        runner = web.AppRunner(self.application(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=SHUTDOWN_S)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        self.address = join_host_port(host, int(runner.addresses[0][1]))
        return self.address

    async def stop(self) -> None:
        """Close the listener, let open responses finish briefly, cancel the rest."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- middleware --------------------------------------------------------------------------

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count every request by endpoint and outcome, and answer the router's errors (404,
        405) and genuine bugs (500, logged) in OpenAI's error shape."""
        status = 499  # unless an answer comes: the handler was cancelled (the client left)
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            message = f"{request.method} {request.path}: {exc.reason}"
            return _json(error_body(message, status), status)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            status = 500
            return _json(error_body("internal error", status), status)
        finally:
            call = request.get(CALL)
            if call is not None:
                outcome = call.outcome
            else:
                outcome = OUTCOME_BY_STATUS.get(status, "completed" if status < 400 else "error")
            resource = request.match_info.route.resource
            endpoint = resource.canonical if resource is not None else "other"
            self.metrics.http_requests.labels(endpoint=endpoint, outcome=outcome).inc()

    # -- endpoints ---------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, COMPLETIONS)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, CHAT)

    async def _complete(self, request: web.Request, endpoint: _Endpoint) -> web.StreamResponse:
        call = Call()
        request[CALL] = call
        reply: _Reply | None = None
        try:
            with self.service.admitted(call, request.headers.items()):
                body = await _json_object(request)
                parsed = endpoint.parse(body, request.headers, self.service.limits,
                                        self.chat_template)
                async with self.service.generation(call, parsed.valid,
                                                   whole=not parsed.stream) as generation:
                    kind = _EventStream if parsed.stream else _Answer
                    reply = kind(request, endpoint, parsed, call, self.model)
                    await reply.open()
                    async for delta in generation:
                        async with self.service.sending():
                            await reply.write(delta)
                async with self.service.sending():
                    await reply.close()
        except GenerationError as err:
            if reply is None or reply.response is None:
                response = error_response(err)
                if request.content.exception() is not None:
                    # A body that could not be decoded: the connection's next
                    # bytes are not a request, so close it after this answer.
                    response.force_close()
                return response
            if err.outcome == "stalled" and request.transport is not None:
                # The client reads nothing, so no error event can reach it: drop the
                # connection and the response it left in the send buffer.
                request.transport.abort()
            else:
                await reply.fail(err)
        except ConnectionResetError:
            log.debug("%s: the client left mid-response", request.path)
        except Exception as err:
            if reply is None or reply.response is None:
                raise
            log.exception("HTTP %s %s failed mid-stream", request.method, request.path)
            await reply.fail(GenerationError(grpc.StatusCode.INTERNAL, f"internal error: {err}"))
        assert reply is not None and reply.response is not None
        return reply.response

    async def _models(self, request: web.Request) -> web.Response:
        try:
            self.service.authorize(request.headers.items())
        except GenerationError as err:
            return error_response(err)
        model = {"id": self.model, "object": "model", "created": self.created,
                 "owned_by": "andes"}
        return _json({"object": "list", "data": [model]})

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.service.draining:
            return _json({"status": "draining"}, 503)
        return _json({"status": "serving"})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


def body_limit(limits: Limits) -> int:
    """The largest request body accepted: room for the longest prompt the limits allow,
    even JSON-escaped (up to 6 bytes a character, 11 a token id), plus 1 MiB for the rest."""
    return 6 * limits.max_prompt_chars + 11 * limits.max_prompt_tokens + 2**20


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as err:
        raise GenerationError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body is larger than {request.client_max_size} bytes",
        ) from err
    except web.RequestPayloadError as err:  # a Content-Encoding or chunking it does not fit
        cause = err.__cause__
        detail = cause.message if isinstance(cause, HttpProcessingError) else str(err)
        # Read no further: aiohttp would otherwise drain the rest of the body after the
        # answer, meet the same error again and log it as unhandled.
        request.content.feed_eof()
        raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request body cannot be read: {detail}") from err
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, or nested too deep
        raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT,
                              "the request body must be a JSON object")
    return body

