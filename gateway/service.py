"""The generation service: one request's way from a front end through the cluster and back.

Both front ends, gRPC ``andes.v1.GenerationService`` (:mod:`gateway.grpc_api`) and the
OpenAI-compatible HTTP API (:mod:`gateway.http_api`), are thin adapters over this one path, so
admission, submission, streaming, delivery tracking and aborts behave the same on both:

authorize -> admit (draining, stream limit) -> validate (the front end's request shape) -> store
the payload in Redis -> Submit to the scheduler -> stream the request's tokens from Redis to the
client.

Each read of the token stream becomes one :class:`Delta` holding every token that piled up
meanwhile (fewer, larger messages when the client or the network is slow). A front end writes a
delta to its client, then asks for the next one: that moment is the delta's delivery time. It
feeds the request's :class:`~andes.qoe.TokenPacer`, whose summary goes to the scheduler: that is
the client's buffer of unread tokens the planner uses.

Ending a stream early always tells the scheduler (``Abort``, from a background task that
outlives the cancelled handler), so an abandoned request frees its KV cache within one worker
iteration. asyncio.CancelledError is re-raised everywhere: both servers cancel the handler task
when the client goes away (grpc.aio also when the deadline passes).

Per-key limits: admission also checks the caller's API key (:mod:`gateway.auth`; without keys
every client is the one ``anonymous`` key) against its request rate and concurrent streams
(:mod:`gateway.ratelimit`): RESOURCE_EXHAUSTED (HTTP 429) naming the limit, with a retry time
for the rate. A stream counts against its key from admission until the admission block is left,
however the request ends (finished, cancelled, failed, disconnected).

Slow clients: a client that stops reading cannot grow the gateway's memory without bound. Each
place tokens could pile up is bounded:

- the request's queue in the :class:`~gateway.streams.StreamHub`: at most ``queue_size``
  chunks, then the hub stops reading that stream from Redis (the entries stay in Redis, bounded
  by the request's ``max_tokens`` and the stream's MAXLEN) and resumes once the queue drains;
- pending text: one :class:`Delta` at a time (what the queue held when it was read); the
  front end writes it before the next one is assembled, so a write that blocks stops reading
  (a whole, non-streamed answer holds its response, bounded by ``max_tokens``);
- gRPC send buffers: ``context.write`` returns only once HTTP/2 flow control has taken the
  message, so the gateway holds at most the one message being written (the client's window
  holds the rest, in the client's memory);
- HTTP response buffers: aiohttp's writes wait for the socket to drain past its high-water
  mark, so a response buffers tens of KiB plus the delta being written.

A stalled stream therefore only holds its slot (``--max-streams``, its key's ``max_streams``)
and its request keeps generating into Redis up to ``max_tokens``. With
``--stalled-client-timeout-s`` a front end's write that has not completed in that time ends the
stream: its request is aborted on the scheduler (freeing its KV cache), it counts as outcome
``stalled``, and the client gets DEADLINE_EXCEEDED after the messages it had accepted (gRPC) or
a dropped connection (HTTP: no error event could reach a client that does not read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from redis.exceptions import RedisError

from andes.qoe import TokenPacer
from andes.tokenstream import TokenChunk
from andes.v1 import generation_pb2
from gateway.auth import ANONYMOUS, ApiKey, ApiKeys
from gateway.delivery import DeliveryReporter, Progress
from gateway.metrics import GatewayMetrics
from gateway.payload import PayloadStore
from gateway.ratelimit import KeyLimiter, KeyLimits
from gateway.scheduler import SchedulerClient, SchedulerError
from gateway.streams import StreamError, StreamHub, StreamInterrupted, Subscription
from gateway.tokens import ApproximateCounter, PromptCounter
from gateway.validation import Limits, ValidationError, ValidRequest

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
    grpc.StatusCode.CANCELLED: "cancelled",
}

MAX_ABORTED_IDS = 65536
"""Request ids remembered as aborted (so each gets one Abort); the oldest are forgotten."""


class GenerationError(Exception):
    """Ends a generation request with a status.

    The status is a gRPC code on both front ends: it is the gateway's own vocabulary (the
    scheduler's errors arrive in it); the gRPC API returns it as is, the HTTP API maps it to an
    HTTP status. ``param`` names the offending request field, when there is one;
    ``retry_after_s`` says when a refused request may be retried (HTTP ``Retry-After``);
    ``outcome`` overrides the metrics outcome the code implies.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, param: str | None = None,
                 retry_after_s: float | None = None, outcome: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        self._outcome = outcome

    @classmethod
    def invalid(cls, err: ValidationError) -> GenerationError:
        """INVALID_ARGUMENT for a rejected field; the message reads ``field: reason``."""
        return cls(grpc.StatusCode.INVALID_ARGUMENT, str(err), param=err.field)

    @property
    def outcome(self) -> str:
        return self._outcome or OUTCOME_BY_CODE.get(self.code, "error")


@dataclass
class Call:
    """One generation request on either front end, from its arrival to its end."""

    deadline_s: float | None = None
    """When the client gives up, on the monotonic clock (None: never)."""
    arrival_unix_s: float = field(default_factory=time.time)
    """Arrival on the wall clock: what the scheduler plans with."""
    arrival_mono_s: float = field(default_factory=time.monotonic)
    """Arrival on the monotonic clock: what the pacer and the metrics measure from."""
    resumed: bool = False
    """A reattached stream: its QoE belongs to the stream that started the request."""
    outcome: str = "error"
    """How it ended (``andes_requests_total``); set when it ends."""

    def time_remaining(self) -> float | None:
        return None if self.deadline_s is None else self.deadline_s - time.monotonic()

    def deadline_passed(self) -> bool:
        remaining = self.time_remaining()
        return remaining is not None and remaining <= 0


@dataclass(frozen=True)
class Delta:
    """The next tokens of one response, as a front end hands them to its client."""

    request_id: str
    index: int
    """Position of its first token in the response (0-based)."""
    token_ids: tuple[int, ...]
    text: str
    finish_reason: int
    """0 until the last delta, then the ``andes.v1.FinishReason``."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens of the response up to the end of this delta (all of them on the last one)."""


class GenerationService:
    """The shared path; :mod:`gateway.server` builds one per gateway for both front ends."""

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
        prompt_counter: PromptCounter | None = None,
        key_limits: KeyLimits | None = None,
        key_limiter: KeyLimiter | None = None,
        stalled_client_timeout_s: float = 0.0,
    ) -> None:
        self.limits = limits
        self.prompt_counter = prompt_counter or ApproximateCounter()
        self.payloads = payloads
        self.hub = hub
        self.scheduler = scheduler
        self.reporter = reporter
        self.metrics = metrics
        self.gateway_id = gateway_id
        self.api_keys = api_keys
        self.max_streams = max_streams
        self.submit_timeout_s = submit_timeout_s
        self.key_limits = key_limits or KeyLimits()
        """Each key's limits where its key file line sets none."""
        self.key_limiter = key_limiter or KeyLimiter()
        self.stalled_client_timeout_s = stalled_client_timeout_s
        self.draining = False
        self.active_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._live: dict[str, set[Subscription]] = {}
        self._aborted: OrderedDict[str, None] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def start_draining(self) -> None:
        """Refuse new requests (UNAVAILABLE); the ones in progress go on."""
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

    # -- a request, step by step -----------------------------------------------------------

    def authorize(self, metadata: Iterable[tuple[str, str | bytes]]) -> ApiKey:
        """The caller's key: UNAUTHENTICATED unless ``metadata`` (gRPC metadata or HTTP
        headers) carries ``authorization: Bearer <key>`` with an accepted key (when keys are
        off: the anonymous key every client shares)."""
        if self.api_keys is None:
            return ANONYMOUS
        key = self.api_keys.identify(metadata)
        if key is None:
            raise GenerationError(grpc.StatusCode.UNAUTHENTICATED,
                                  "missing or unknown API key (authorization: Bearer <key>)")
        return key

    def key_streams(self, name: str) -> int:
        """Streams in progress of the API key called ``name``."""
        return self.key_limiter.streams(name)

    @contextlib.contextmanager
    def admitted(self, call: Call, metadata: Iterable[tuple[str, str | bytes]]) -> Iterator[None]:
        """Authorize and admit ``call``, count it as a stream in progress (of the gateway and
        of its key) while the block runs, and record how it ended. A :class:`ValidationError`
        raised inside is the request's fault: it leaves the block as INVALID_ARGUMENT."""
        started = False
        key_admitted: str | None = None
        try:
            key = self.authorize(metadata)
            if self.draining:
                raise GenerationError(grpc.StatusCode.UNAVAILABLE,
                                      "the gateway is draining: retry on another gateway")
            if self.active_streams >= self.max_streams:
                raise GenerationError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"the gateway is at its limit of {self.max_streams} streams")
            self._admit_key(key)
            key_admitted = key.name
            self._stream_started()
            started = True
            yield
        except ValidationError as err:
            call.outcome = "invalid"
            raise GenerationError.invalid(err) from err
        except GenerationError as err:
            call.outcome = err.outcome
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            call.outcome = "deadline" if call.deadline_passed() else "disconnected"
            raise
        finally:
            if started:
                self._stream_ended()
            if key_admitted is not None:
                self.key_limiter.release(key_admitted)
            self.metrics.requests.labels(outcome=call.outcome).inc()

    @contextlib.asynccontextmanager
    async def sending(self) -> AsyncIterator[None]:
        """Wrap a front end's write to its client: with ``--stalled-client-timeout-s``, a write
        the client has not accepted within it raises GenerationError (DEADLINE_EXCEEDED,
        outcome ``stalled``), which aborts the request like any error inside a generation."""
        timeout_s = self.stalled_client_timeout_s
        if not timeout_s:
            yield
            return
        timeout = asyncio.timeout(timeout_s)
        try:
            async with timeout:
                yield
        except TimeoutError as err:
            if not timeout.expired():
                raise  # not ours
            raise GenerationError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the client accepted no message for {timeout_s:g} s (stalled client): the "
                "stream was cancelled and its request aborted", outcome="stalled",
            ) from err

    @contextlib.asynccontextmanager
    async def generation(
        self, call: Call, valid: ValidRequest, *, whole: bool = False
    ) -> AsyncIterator[Generation]:
        """Start ``valid`` (or reattach to it) and give its response as a :class:`Generation`.

        Raises GenerationError before the block if the request cannot start. Leaving the block
        before the response's last delta was handed out aborts the request on the scheduler.
        ``whole``: the response comes as one delta at its end (for a front end that answers
        only then, so that its tokens count as delivered when they really are).
        """
        request_id = valid.request_id
        key = self.payloads.stream_key(request_id)
        if valid.is_resume:
            prompt_tokens, pacer = await self._reattach(valid, call)
            try:
                subscription = await self.hub.subscribe(key, valid.resume_from_index)
            except BaseException as err:
                self._abort_soon(request_id, _abort_reason(err, call))
                raise
        else:
            prompt_tokens = self.prompt_counter.count(valid.prompt, valid.prompt_token_ids)
            pacer = TokenPacer(valid.ttft_s, valid.tds, arrival_s=call.arrival_mono_s)
            await self._store_payload(valid, prompt_tokens, call)
            # Read the stream before the request is placed: its worker may append the first
            # tokens before Submit returns, and a reader that already reads the key hands them
            # over at once, not after a wake-up round trip to Redis.
            try:
                subscription = await self.hub.subscribe(key)
            except BaseException:
                with contextlib.suppress(RedisError):
                    await self.payloads.delete(request_id)  # free the id it claimed
                raise
            try:
                await self._submit(valid, prompt_tokens, call)
            except BaseException:
                subscription.close()
                raise
        generation = Generation(self, call, valid, prompt_tokens, pacer, subscription,
                                whole=whole)
        self._live.setdefault(request_id, set()).add(subscription)
        error: BaseException | None = None
        try:
            yield generation
        except BaseException as err:
            error = err
            raise
        finally:
            await generation.aclose()
            if not generation.ended:
                self._abort_soon(request_id, _abort_reason(error, call))
                generation.report(complete=True)
            subscription.close()
            streams = self._live.get(request_id)
            if streams is not None:
                streams.discard(subscription)
                if not streams:
                    del self._live[request_id]

    async def cancel(self, request_id: str) -> bool:
        """Stop ``request_id`` from anywhere: its streams on this gateway end with CANCELLED
        and the scheduler aborts it. Whether there was anything to cancel."""
        local = list(self._live.get(request_id, ()))
        for subscription in local:
            subscription.interrupt(CANCELLED)
        self._aborted[request_id] = None
        try:
            found = await self.scheduler.abort(request_id, "cancelled by the client")
        except SchedulerError as err:
            if not local:
                raise GenerationError(err.code, err.details) from err
            log.warning("Cancel %s: %s (the local stream is cancelled)", request_id, err)
            found = False
        return found or bool(local)

    def _admit_key(self, key: ApiKey) -> None:
        """Count a stream of ``key``, or RESOURCE_EXHAUSTED naming the limit it is over."""
        refusal = self.key_limiter.admit(key.name, key.limits(self.key_limits))
        if refusal is not None:
            self.metrics.rate_limited.labels(key=key.name, limit=refusal.limit).inc()
            raise GenerationError(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.message,
                                  retry_after_s=refusal.retry_after_s)

    def _stream_started(self) -> None:
        self.active_streams += 1
        self._idle.clear()
        self.metrics.active_streams.inc()

    def _stream_ended(self) -> None:
        self.active_streams -= 1
        self.metrics.active_streams.dec()
        if self.active_streams == 0:
            self._idle.set()

    async def _reattach(self, valid: ValidRequest, call: Call) -> tuple[int, TokenPacer]:
        try:
            stored = await self.payloads.lookup(valid.request_id)
        except RedisError as err:
            raise GenerationError(
                grpc.StatusCode.UNAVAILABLE,
                f"Redis unavailable: {err}; reattaching to {valid.request_id!r} may be retried",
            ) from err
        except ValueError as err:
            raise GenerationError(grpc.StatusCode.INTERNAL, str(err)) from err
        if stored is None:
            raise GenerationError(
                grpc.StatusCode.NOT_FOUND,
                f"request_id: no live or recently finished request {valid.request_id!r}",
            )
        # The pacer runs from the original arrival; the tokens before the resume index are
        # taken as delivered now (the old stream's timeline is gone), which errs on the side
        # of a late client, so the planner favours a client that lost its stream.
        if valid.resume_from_index > stored.max_tokens:
            raise GenerationError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"resume_from_index: {valid.resume_from_index} is past the end of the response "
                f"(max_tokens {stored.max_tokens})",
            )
        call.arrival_mono_s -= call.arrival_unix_s - stored.arrival_unix_s
        call.arrival_unix_s = stored.arrival_unix_s
        call.resumed = True
        pacer = TokenPacer(stored.ttft_s, stored.tds, arrival_s=call.arrival_mono_s)
        pacer.advance(valid.resume_from_index, time.monotonic())
        return stored.prompt_tokens, pacer

    async def _store_payload(self, valid: ValidRequest, prompt_tokens: int, call: Call) -> None:
        """Store the request for its worker and for reattaching clients; this also claims its
        id (and the token stream's key)."""
        request_id = valid.request_id
        try:
            created = await self.payloads.create(valid, prompt_tokens, call.arrival_unix_s)
        except RedisError as err:
            raise GenerationError(grpc.StatusCode.UNAVAILABLE,
                                  f"Redis unavailable: {err}") from err
        if not created:
            raise GenerationError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request_id: {request_id!r} is in use (live, or finished too recently to reuse)",
            )
        self._aborted.pop(request_id, None)  # a new request under an old id can be aborted

    async def _submit(self, valid: ValidRequest, prompt_tokens: int, call: Call) -> None:
        """Place the stored request with the scheduler; undoes the payload if refused."""
        request_id = valid.request_id
        remaining = call.time_remaining()
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
                arrival_unix_s=call.arrival_unix_s,
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
            raise GenerationError(err.code, err.details) from err
        except asyncio.CancelledError as err:
            # The scheduler may have placed it before the client left: stop it there.
            self._abort_soon(request_id, _abort_reason(err, call))
            raise

    # -- side effects that must outlive the handler ----------------------------------------

    def _abort_soon(self, request_id: str, reason: str) -> None:
        """Abort on the scheduler from a task of its own: the caller is usually being
        cancelled. Once per request id (the scheduler's Abort is idempotent anyway)."""
        if request_id in self._aborted:
            return
        self._aborted[request_id] = None
        while len(self._aborted) > MAX_ABORTED_IDS:
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


class Generation:
    """A started request's response: iterate it (once) for its :class:`Delta` s.

    Asking for the next delta says that the previous one has been written to the client: that
    moment is its delivery time (for the pacer, the scheduler's delivery reports and the
    metrics). So a front end writes each delta before it asks for the next one.
    """

    def __init__(
        self,
        service: GenerationService,
        call: Call,
        valid: ValidRequest,
        prompt_tokens: int,
        pacer: TokenPacer,
        subscription: Subscription,
        *,
        whole: bool,
    ) -> None:
        self.request_id = valid.request_id
        self.prompt_tokens = prompt_tokens
        self.ended = False
        """The last delta has been handed out: the request needs no abort any more."""
        self._service = service
        self._call = call
        self._pacer = pacer
        self._subscription = subscription
        self._first_sent: float | None = None
        self._last_sent: float | None = None
        self._deltas = self._run(valid.resume_from_index, whole)

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._deltas

    async def aclose(self) -> None:
        await self._deltas.aclose()

    def report(self, *, complete: bool) -> None:
        """Queue the pacer's summary for the scheduler's next delivery batch."""
        pacer = self._pacer
        self._service.reporter.update(Progress(
            request_id=self.request_id,
            delivered_tokens=pacer.count,
            digest_max_s=pacer.digest_max,
            delay_sum_s=pacer.delay_sum,
            arrival_unix_s=self._call.arrival_unix_s,
            complete=complete,
        ))

    async def _run(self, position: int, whole: bool) -> AsyncGenerator[Delta, None]:
        start = position
        tokens: list[int] = []
        texts: list[str] = []
        while True:
            chunks, stop = await self._read()
            finish = stop.finish_reason if isinstance(stop, StreamInterrupted) else 0
            for chunk in chunks:
                part = _continuing(chunk, position, self.request_id)
                if part is None:
                    continue
                tokens.extend(part.token_ids)
                texts.append(part.text)
                position = part.end
                if part.finish_reason:
                    finish = part.finish_reason
                    break
            if finish or (tokens and not whole):
                delta = Delta(
                    request_id=self.request_id, index=start, token_ids=tuple(tokens),
                    text="".join(texts), finish_reason=finish, prompt_tokens=self.prompt_tokens,
                    completion_tokens=position,
                )
                self.ended = bool(finish)
                yield delta
                self._delivered(delta)
                start, tokens, texts = position, [], []
            if finish:
                self._finished(finish, locally=isinstance(stop, StreamInterrupted))
                return
            if isinstance(stop, StreamError):
                raise GenerationError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"reading the token stream of {self.request_id!r} failed: {stop}; the "
                    f"request goes on: reattach with request_id={self.request_id!r} and "
                    f"resume_from_index={position}",
                )

    async def _read(self) -> tuple[list[TokenChunk], StreamInterrupted | StreamError | None]:
        """Everything available now (waiting for at least one chunk), and how reading ended
        if it did: an interruption or an error found after some chunks is returned so the
        chunks go out first."""
        subscription = self._subscription
        remaining = self._call.time_remaining()
        if remaining is not None and remaining <= 0:
            raise GenerationError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        try:
            async with asyncio.timeout(remaining):
                chunks = [await subscription.get()]
        except TimeoutError as err:
            raise GenerationError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from err
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

    def _delivered(self, delta: Delta) -> None:
        now = time.monotonic()
        count = len(delta.token_ids)
        if count:
            metrics = self._service.metrics
            self._pacer.advance(count, now)
            metrics.tokens_delivered.inc(count)
            if self._first_sent is None:
                self._first_sent = now
                if not self._call.resumed:
                    metrics.ttft_seconds.observe(now - self._call.arrival_mono_s)
            self._last_sent = now
        self.report(complete=bool(delta.finish_reason))

    def _finished(self, finish: int, *, locally: bool) -> None:
        service, call, pacer = self._service, self._call, self._pacer
        if not call.resumed:
            service._background_task(service._expire_payload(self.request_id))
            service.metrics.request_qoe.observe(pacer.qoe())
            first, last = self._first_sent, self._last_sent
            if first is not None and last is not None and last > first:
                service.metrics.delivered_tds.observe((pacer.count - 1) / (last - first))
        if finish == ERROR:
            raise GenerationError(grpc.StatusCode.INTERNAL, "the request failed on its worker")
        call.outcome = "cancelled" if finish == CANCELLED or locally else "completed"


def _continuing(chunk: TokenChunk, position: int, request_id: str) -> TokenChunk | None:
    """The part of ``chunk`` from ``position`` on; an error if tokens before it are missing."""
    part = chunk.after(position)
    if part is None:
        return None
    if part.index > position:
        raise GenerationError(grpc.StatusCode.DATA_LOSS,
                              f"tokens {position}..{part.index - 1} of {request_id!r} are "
                              "missing from its token stream")
    if part.end < position:
        raise GenerationError(grpc.StatusCode.OUT_OF_RANGE,
                              f"resume_from_index: {position} is past the end of the response "
                              f"({part.end} tokens)")
    return part


def _abort_reason(err: BaseException | None, call: Call) -> str:
    if isinstance(err, GenerationError):
        return f"gateway: {err.message}"
    if isinstance(err, asyncio.CancelledError | ConnectionResetError):
        return "deadline exceeded" if call.deadline_passed() else "client disconnected"
    if err is None:
        return "gateway: the response was left before its end"
    return f"gateway error: {err!r}"
