"""``andes.v1.GenerationService``: admission, submission, and the token stream to the client.

A Generate call goes: authorize -> admit (draining, stream limit) -> validate -> store the
payload in Redis -> Submit to the scheduler -> stream the request's tokens from Redis to the
client. Each read of the token stream becomes one ``GenerateResponse`` holding every token that
piled up meanwhile (fewer, larger messages when the client or the network is slow), and the
moment each message is handed to gRPC feeds the request's :class:`~andes.qoe.TokenPacer`, whose
summary goes to the scheduler: that is the client's buffer of unread tokens the planner uses.

Ending a stream early always tells the scheduler (``Abort``, from a background task that
outlives the cancelled handler), so an abandoned request frees its KV cache within one worker
iteration. asyncio.CancelledError is re-raised everywhere: grpc.aio cancels the handler task
when the client goes away or its deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from redis.exceptions import RedisError

from andes.qoe import TokenPacer
from andes.tokenstream import TokenChunk
from andes.v1 import generation_pb2, generation_pb2_grpc
from gateway.auth import ApiKeys
from gateway.delivery import DeliveryReporter, Progress
from gateway.metrics import GatewayMetrics
from gateway.payload import PayloadStore
from gateway.scheduler import SchedulerClient, SchedulerError
from gateway.streams import StreamError, StreamHub, StreamInterrupted, Subscription
from gateway.tokens import count_prompt_tokens
from gateway.validation import Limits, ValidationError, ValidRequest, check_request_id, validate

log = logging.getLogger(__name__)

CANCELLED = generation_pb2.FINISH_REASON_CANCELLED
ERROR = generation_pb2.FINISH_REASON_ERROR

OUTCOME_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.ALREADY_EXISTS: "already_exists",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
}


class _StatusError(Exception):
    """Ends a Generate call with a gRPC status (raised by the steps, turned into abort)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def outcome(self) -> str:
        return OUTCOME_BY_CODE.get(self.code, "error")


@dataclass
class _Timeline:
    """When the request arrived, on both clocks (wall for the scheduler, monotonic for us)."""

    arrival_unix_s: float
    arrival_mono_s: float
    resumed: bool = False


class GenerationService(generation_pb2_grpc.GenerationServiceServicer):
    """The servicer; :mod:`gateway.server` wires it to the gRPC server."""

    def __init__(
        self,
        *,
        limits: Limits,
        payloads: PayloadStore,
        hub: StreamHub,
        scheduler: SchedulerClient,
        reporter: DeliveryReporter,
        metrics: GatewayMetrics,
        gateway_id: str,
        api_keys: ApiKeys | None = None,
        max_streams: int = 4096,
        submit_timeout_s: float = 10.0,
    ) -> None:
        self.limits = limits
        self.payloads = payloads
        self.hub = hub
        self.scheduler = scheduler
        self.reporter = reporter
        self.metrics = metrics
        self.gateway_id = gateway_id
        self.api_keys = api_keys
        self.max_streams = max_streams
        self.submit_timeout_s = submit_timeout_s
        self.draining = False
        self.active_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._live: dict[str, set[Subscription]] = {}
        self._aborted: OrderedDict[str, None] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def start_draining(self) -> None:
        """Refuse new Generate calls (UNAVAILABLE); the ones in progress go on."""
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no stream is in progress; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def flush_background(self, timeout_s: float = 5.0) -> None:
        """Let pending Aborts reach the scheduler before the channel closes."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout_s)

    # -- RPCs ------------------------------------------------------------------------------

    async def Generate(self, request: generation_pb2.GenerateRequest, context: Any) -> None:
        timeline = _Timeline(arrival_unix_s=time.time(), arrival_mono_s=time.monotonic())
        outcome = "error"
        admitted = False
        try:
            self._admit(context)
            admitted = True
            self._stream_started()
            outcome = await self._generate(request, context, timeline)
        except _StatusError as status:
            outcome = status.outcome
            await _fail(context, status.code, status.message)
        except asyncio.CancelledError:
            outcome = "deadline" if _deadline_passed(context) else "disconnected"
            raise
        finally:
            if admitted:
                self._stream_ended()
            self.metrics.requests.labels(outcome=outcome).inc()

    async def Cancel(
        self, request: generation_pb2.CancelRequest, context: Any
    ) -> generation_pb2.CancelResponse:
        try:
            self._authorize(context)
            request_id = check_request_id(request.request_id)
        except ValidationError as err:
            await _fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except _StatusError as status:
            await _fail(context, status.code, status.message)
        local = list(self._live.get(request_id, ()))
        for subscription in local:
            subscription.interrupt(CANCELLED)
        self._aborted[request_id] = None
        try:
            found = await self.scheduler.abort(request_id, "cancelled by the client")
        except SchedulerError as err:
            if not local:
                await _fail(context, err.code, err.details)
            log.warning("Cancel %s: %s (the local stream is cancelled)", request_id, err)
            found = False
        return generation_pb2.CancelResponse(found=found or bool(local))

    # -- Generate, step by step ------------------------------------------------------------

    def _admit(self, context: Any) -> None:
        self._authorize(context)
        if self.draining:
            raise _StatusError(grpc.StatusCode.UNAVAILABLE,
                               "the gateway is draining: retry on another gateway")
        if self.active_streams >= self.max_streams:
            raise _StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the gateway is at its limit of {self.max_streams} streams")

    def _authorize(self, context: Any) -> None:
        if self.api_keys is None:
            return
        metadata = context.invocation_metadata() or ()
        if not self.api_keys.allows((item[0], item[1]) for item in metadata):
            raise _StatusError(grpc.StatusCode.UNAUTHENTICATED,
                               "missing or unknown API key (metadata authorization: Bearer <key>)")

    def _stream_started(self) -> None:
        self.active_streams += 1
        self._idle.clear()
        self.metrics.active_streams.inc()

    def _stream_ended(self) -> None:
        self.active_streams -= 1
        self.metrics.active_streams.dec()
        if self.active_streams == 0:
            self._idle.set()

    async def _generate(
        self, request: generation_pb2.GenerateRequest, context: Any, timeline: _Timeline
    ) -> str:
        try:
            valid = validate(request, self.limits)
        except ValidationError as err:
            raise _StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        if valid.is_resume:
            prompt_tokens, pacer = await self._reattach(valid, timeline)
        else:
            prompt_tokens = count_prompt_tokens(valid.prompt, valid.prompt_token_ids)
            pacer = TokenPacer(valid.ttft_s, valid.tds, arrival_s=timeline.arrival_mono_s)
            await self._submit(valid, prompt_tokens, context, timeline)
        try:
            subscription = await self.hub.subscribe(
                self.payloads.stream_key(valid.request_id), valid.resume_from_index
            )
        except BaseException as err:
            self._abort_soon(valid.request_id, _abort_reason(err, context))
            raise
        return await self._stream(valid, prompt_tokens, pacer, subscription, context, timeline)

    async def _reattach(self, valid: ValidRequest, timeline: _Timeline) -> tuple[int, TokenPacer]:
        try:
            stored = await self.payloads.lookup(valid.request_id)
        except RedisError as err:
            raise _StatusError(grpc.StatusCode.UNAVAILABLE, f"Redis unavailable: {err}") from err
        except ValueError as err:
            raise _StatusError(grpc.StatusCode.INTERNAL, str(err)) from err
        if stored is None:
            raise _StatusError(
                grpc.StatusCode.NOT_FOUND,
                f"request_id: no live or recently finished request {valid.request_id!r}",
            )
        # The pacer runs from the original arrival; the tokens before the resume index are
        # taken as delivered now (the old stream's timeline is gone), which errs on the side
        # of a late client, so the planner favours a client that lost its stream.
        timeline.arrival_mono_s -= timeline.arrival_unix_s - stored.arrival_unix_s
        timeline.arrival_unix_s = stored.arrival_unix_s
        timeline.resumed = True
        pacer = TokenPacer(stored.ttft_s, stored.tds, arrival_s=timeline.arrival_mono_s)
        pacer.deliver(valid.resume_from_index, time.monotonic())
        return stored.prompt_tokens, pacer

    async def _submit(
        self, valid: ValidRequest, prompt_tokens: int, context: Any, timeline: _Timeline
    ) -> None:
        request_id = valid.request_id
        try:
            created = await self.payloads.create(valid, prompt_tokens, timeline.arrival_unix_s)
        except RedisError as err:
            raise _StatusError(grpc.StatusCode.UNAVAILABLE, f"Redis unavailable: {err}") from err
        if not created:
            raise _StatusError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request_id: {request_id!r} is in use (live, or finished too recently to reuse)",
            )
        self._aborted.pop(request_id, None)  # a new request under an old id can be aborted
        remaining = context.time_remaining()
        timeout_s = self.submit_timeout_s if remaining is None else min(
            self.submit_timeout_s, remaining
        )
        try:
            await self.scheduler.submit(
                request_id=request_id,
                gateway_id=self.gateway_id,
                prompt_tokens=prompt_tokens,
                max_tokens=valid.max_tokens,
                qoe=generation_pb2.QoESpec(ttft_s=valid.ttft_s, tds=valid.tds),
                sampling=valid.sampling.to_proto(),
                arrival_unix_s=timeline.arrival_unix_s,
                payload_key=self.payloads.payload_key(request_id),
                token_stream_key=self.payloads.stream_key(request_id),
                timeout_s=max(timeout_s, 0.001),
            )
        except SchedulerError as err:
            if err.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL):
                # The scheduler may have placed it before failing or timing out: stop it.
                self._abort_soon(request_id, f"gateway: Submit failed ({err.code.name})")
            with contextlib.suppress(RedisError):
                await self.payloads.delete(request_id)
            raise _StatusError(err.code, err.details) from err
        except asyncio.CancelledError:
            # The scheduler may have placed it before the client left: stop it there.
            self._abort_soon(request_id, _abort_reason(None, context))
            raise

    async def _stream(
        self,
        valid: ValidRequest,
        prompt_tokens: int,
        pacer: TokenPacer,
        subscription: Subscription,
        context: Any,
        timeline: _Timeline,
    ) -> str:
        request_id = valid.request_id
        self._live.setdefault(request_id, set()).add(subscription)
        position = valid.resume_from_index
        first_sent: float | None = None
        last_sent: float | None = None
        ended = False
        try:
            while True:
                chunks, stop = await self._read(subscription, context)
                tokens: list[int] = []
                texts: list[str] = []
                finish = stop.finish_reason if isinstance(stop, StreamInterrupted) else 0
                start = position
                for chunk in chunks:
                    part = _continuing(chunk, position, request_id)
                    if part is None:
                        continue
                    tokens.extend(part.token_ids)
                    texts.append(part.text)
                    position = part.end
                    if part.finish_reason:
                        finish = part.finish_reason
                        break
                if tokens or finish:
                    response = generation_pb2.GenerateResponse(
                        request_id=request_id, index=start, token_ids=tokens, text="".join(texts),
                        finish_reason=finish,  # type: ignore[arg-type]
                    )
                    if finish:
                        response.usage.prompt_tokens = prompt_tokens
                        response.usage.completion_tokens = position
                        ended = True
                    await context.write(response)
                    now = time.monotonic()
                    if tokens:
                        pacer.deliver(len(tokens), now)
                        self.metrics.tokens_delivered.inc(len(tokens))
                        if first_sent is None and not timeline.resumed:
                            self.metrics.ttft_seconds.observe(now - timeline.arrival_mono_s)
                        first_sent = now if first_sent is None else first_sent
                        last_sent = now
                    self._report(request_id, pacer, timeline, complete=bool(finish))
                if finish:
                    return self._finished(request_id, finish, pacer, timeline, first_sent,
                                          last_sent, locally=isinstance(stop, StreamInterrupted))
                if isinstance(stop, StreamError):
                    raise _StatusError(grpc.StatusCode.UNAVAILABLE,
                                       f"reading the token stream failed: {stop}")
        except BaseException as err:
            if not ended:
                self._abort_soon(request_id, _abort_reason(err, context))
                self._report(request_id, pacer, timeline, complete=True)
            raise
        finally:
            subscription.close()
            streams = self._live.get(request_id)
            if streams is not None:
                streams.discard(subscription)
                if not streams:
                    del self._live[request_id]

    async def _read(
        self, subscription: Subscription, context: Any
    ) -> tuple[list[TokenChunk], StreamInterrupted | StreamError | None]:
        """Everything available now (waiting for at least one chunk), and how reading ended
        if it did: an interruption or an error found after some chunks is returned so the
        chunks go out first."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise _StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        try:
            async with asyncio.timeout(remaining):
                chunks = [await subscription.get()]
        except TimeoutError as err:
            raise _StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from err
        except (StreamInterrupted, StreamError) as stop:
            return [], stop
        while not chunks[-1].finish_reason:
            try:
                more = subscription.get_nowait()
            except (StreamInterrupted, StreamError) as stop:
                return chunks, stop
            if more is None:
                break
            chunks.append(more)
        return chunks, None

    def _finished(
        self,
        request_id: str,
        finish: int,
        pacer: TokenPacer,
        timeline: _Timeline,
        first_sent: float | None,
        last_sent: float | None,
        *,
        locally: bool,
    ) -> str:
        if not timeline.resumed:
            self._background_task(self._expire_payload(request_id))
            self.metrics.request_qoe.observe(pacer.qoe())
            if first_sent is not None and last_sent is not None and last_sent > first_sent:
                self.metrics.delivered_tds.observe((pacer.count - 1) / (last_sent - first_sent))
        if finish == ERROR:
            raise _StatusError(grpc.StatusCode.INTERNAL, "the request failed on its worker")
        if finish == CANCELLED or locally:
            return "cancelled"
        return "completed"

    # -- side effects that must outlive the handler ----------------------------------------

    def _report(self, request_id: str, pacer: TokenPacer, timeline: _Timeline,
                *, complete: bool) -> None:
        self.reporter.update(Progress(
            request_id=request_id,
            delivered_tokens=pacer.count,
            digest_max_s=pacer.digest_max,
            delay_sum_s=pacer.delay_sum,
            arrival_unix_s=timeline.arrival_unix_s,
            complete=complete,
        ))

    def _abort_soon(self, request_id: str, reason: str) -> None:
        """Abort on the scheduler from a task of its own: the caller is usually being
        cancelled. Once per request id (the scheduler's Abort is idempotent anyway)."""
        if request_id in self._aborted:
            return
        self._aborted[request_id] = None
        while len(self._aborted) > 65536:
            self._aborted.popitem(last=False)
        self._background_task(self._abort(request_id, reason))

    async def _abort(self, request_id: str, reason: str) -> None:
        for attempt in range(3):
            try:
                await self.scheduler.abort(request_id, reason)
                return
            except SchedulerError as err:
                if err.code != grpc.StatusCode.UNAVAILABLE or attempt == 2:
                    log.warning("Abort %s (%s) failed: %s", request_id, reason, err)
                    return
                await asyncio.sleep(0.1 * 2**attempt)

    async def _expire_payload(self, request_id: str) -> None:
        try:
            await self.payloads.finished(request_id)
        except RedisError as err:
            log.warning("expiring the payload of %s failed: %s", request_id, err)

    def _background_task(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _continuing(chunk: TokenChunk, position: int, request_id: str) -> TokenChunk | None:
    """The part of ``chunk`` from ``position`` on; an error if tokens before it are missing."""
    part = chunk.after(position)
    if part is None:
        return None
    if part.index > position:
        raise _StatusError(grpc.StatusCode.DATA_LOSS,
                           f"tokens {position}..{part.index - 1} of {request_id!r} are missing "
                           "from its token stream")
    if part.end < position:
        raise _StatusError(grpc.StatusCode.OUT_OF_RANGE,
                           f"resume_from_index: {position} is past the end of the response "
                           f"({part.end} tokens)")
    return part


async def _fail(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the RPC with ``code`` (``context.abort`` raises; this says so to the type checker)."""
    await context.abort(code, message)
    raise AssertionError("context.abort returned")


def _deadline_passed(context: Any) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _abort_reason(err: BaseException | None, context: Any) -> str:
    if isinstance(err, _StatusError):
        return f"gateway: {err.message}"
    if err is None or isinstance(err, asyncio.CancelledError):
        return "deadline exceeded" if _deadline_passed(context) else "client disconnected"
    return f"gateway error: {err!r}"
