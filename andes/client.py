"""The client SDK: stream a generation from an Andes gateway, paced like a reader.

The gateway pushes tokens as soon as they exist, sometimes in bursts; a person reads at a
steady speed. :class:`AsyncAndesClient` receives the stream in a background task (so receipt
times are exact however slowly the caller consumes) and, with ``paced=True``, hands each token
to the caller at its show time from :class:`andes.qoe.TokenPacer`: never faster than ``tds``
tokens/s, never later than it arrived. The stream's QoE is computed here, at the client, from
the receipt times relative to the moment the request was sent (``andes.qoe.qoe``), which is the
number the service is trying to maximize.

    async with AsyncAndesClient("127.0.0.1:50051") as client:
        stream = client.generate("Tell me a story", max_tokens=64)
        async for event in stream:
            print(event.text, end="", flush=True)
        print(f"QoE {stream.qoe:.3f}")

:class:`AndesClient` is the same for synchronous code (it runs the asynchronous client on an
event loop in a thread of its own). Times in events are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc

from andes.qoe import TokenPacer, qoe
from andes.tls import ChannelTls, aio_channel
from andes.v1 import generation_pb2, generation_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"

CHANNEL_OPTIONS = [
    # Notice a dead gateway on long, quiet streams; the gateway accepts pings every 10 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]

FINISH_REASONS = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_CANCELLED: "cancelled",
    generation_pb2.FINISH_REASON_ERROR: "error",
}

T = TypeVar("T")


class AndesError(Exception):
    """A failed call: ``code`` is the gRPC status name (``"INVALID_ARGUMENT"``, ...)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def _error(err: Any) -> AndesError:
    return AndesError(err.code().name, err.details() or "")


@dataclass(frozen=True)
class TokenEvent:
    """Output handed to the caller: one token when paced, one message otherwise.

    ``index`` is the position of the (first) token in the response; ``text`` the text it adds
    (paced tokens share their message's text proportionally by characters: the gateway sends
    text per message, not per token, so concatenating every event's text is exact but the
    split between the tokens of one message is approximate); ``token_id`` is set for a single
    token; ``received_at`` is when its message arrived and ``shown_at`` when the pacer shows
    it (equal to ``received_at`` when not paced).
    """

    index: int
    text: str
    token_id: int | None
    received_at: float
    shown_at: float
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


_END = object()


class GenerationStream(AsyncIterator[TokenEvent]):
    """One Generate call; iterate it for :class:`TokenEvent` s. After (or during) iteration,
    ``qoe``, ``ttft``, ``finish_reason``, ``usage`` and ``text`` describe the response."""

    def __init__(
        self,
        stub: Any,
        request: generation_pb2.GenerateRequest,
        *,
        ttft_s: float,
        tds: float,
        paced: bool,
        metadata: Sequence[tuple[str, str]],
        timeout_s: float | None,
    ) -> None:
        self.request_id = request.request_id
        self.ttft_s = ttft_s
        self.tds = tds
        self.paced = paced
        self.sent_at: float | None = None
        self.receipt_times: list[float] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self._stub = stub
        self._request = request
        self._metadata = tuple(metadata)
        self._timeout_s = timeout_s
        self._texts: list[str] = []
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._messages: asyncio.Queue[Any] = asyncio.Queue()
        self._pending: collections.deque[TokenEvent] = collections.deque()
        self._pacer = TokenPacer(ttft_s, tds)
        self._next_index = int(request.resume_from_index)
        self._done = False

    # -- results ---------------------------------------------------------------------------

    @property
    def qoe(self) -> float:
        """QoE of what was received so far (the final QoE once the stream ended)."""
        if self.sent_at is None:
            return 0.0
        return qoe([t - self.sent_at for t in self.receipt_times], self.ttft_s, self.tds)

    @property
    def ttft(self) -> float | None:
        """Seconds from sending the request to receiving the first token."""
        if self.sent_at is None or not self.receipt_times:
            return None
        return self.receipt_times[0] - self.sent_at

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._texts)

    # -- iteration -------------------------------------------------------------------------

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._reader is None:
            self._start()
        while not self._pending:
            if self._done:
                raise StopAsyncIteration
            item = await self._messages.get()
            if item is _END:
                self._done = True
                raise StopAsyncIteration
            if isinstance(item, BaseException):
                self._done = True
                raise item
            message, received_at, shown = item
            self._pending.extend(self._events(message, received_at, shown))
        event = self._pending.popleft()
        delay = event.shown_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return event

    async def aclose(self) -> None:
        """Stop the stream; if it had not finished, the gateway cancels the request."""
        self._done = True
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _start(self) -> None:
        self.sent_at = time.monotonic()
        self._pacer = TokenPacer(self.ttft_s, self.tds, arrival_s=self.sent_at)
        self._call = self._stub.Generate(
            self._request, metadata=self._metadata, timeout=self._timeout_s
        )
        self._reader = asyncio.create_task(self._read(), name=f"andes-stream {self.request_id}")

    async def _read(self) -> None:
        """Receive messages as they come, stamping each with its receipt time."""
        try:
            async for message in self._call:
                received_at = time.monotonic()
                if message.index != self._next_index:
                    raise AndesError("DATA_LOSS", f"expected index {self._next_index}, "
                                                  f"got {message.index}")
                count = len(message.token_ids)
                self._next_index += count
                self.receipt_times.extend([received_at] * count)
                shown = self._pacer.deliver(count, received_at)
                self._texts.append(message.text)
                if message.finish_reason:
                    self.finish_reason = FINISH_REASONS.get(message.finish_reason, "unknown")
                    self.usage = Usage(message.usage.prompt_tokens,
                                       message.usage.completion_tokens)
                self._messages.put_nowait((message, received_at, shown))
            self._messages.put_nowait(_END)
        except grpc.aio.AioRpcError as err:
            self._messages.put_nowait(_error(err))
        except AndesError as err:
            self._call.cancel()
            self._messages.put_nowait(err)

    def _events(
        self, message: generation_pb2.GenerateResponse, received_at: float, shown: list[float]
    ) -> list[TokenEvent]:
        token_ids = tuple(message.token_ids)
        if not token_ids:
            return []
        if not self.paced:
            return [TokenEvent(
                index=message.index, text=message.text,
                token_id=token_ids[0] if len(token_ids) == 1 else None,
                received_at=received_at, shown_at=received_at, token_ids=token_ids,
            )]
        texts = split_text(message.text, len(token_ids))
        return [
            TokenEvent(index=message.index + i, text=texts[i], token_id=token,
                       received_at=received_at, shown_at=shown[i], token_ids=(token,))
            for i, token in enumerate(token_ids)
        ]


def split_text(text: str, parts: int) -> list[str]:
    """``text`` cut into ``parts`` consecutive pieces of about equal length (some may be
    empty); their concatenation is ``text``."""
    bounds = [round(len(text) * i / parts) for i in range(parts + 1)]
    return [text[bounds[i]:bounds[i + 1]] for i in range(parts)]


class AsyncAndesClient:
    """A connection to a gateway (one channel, reused by every call).

    TLS: ``tls_ca`` (a PEM file of the CA that signed the gateway's certificate) turns it on;
    ``tls_cert`` and ``tls_key`` (PEM files) are this client's identity for a gateway that
    requires client certificates; ``tls=True`` alone trusts gRPC's default root certificates.
    The files are read here, so a bad one raises :class:`andes.tls.TlsError` (a ValueError)
    at once.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        api_key: str | None = None,
        *,
        tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.target = target
        self._tls = ChannelTls(ca=tls_ca or "", cert=tls_cert or "", key=tls_key or "",
                               system_roots=tls).load()
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        self._channel: Any = None
        self._stub: Any = None

    def _service(self) -> Any:
        # Created on first use, inside the event loop that will run the calls.
        if self._stub is None:
            self._channel = aio_channel(self.target, self._tls, CHANNEL_OPTIONS)
            self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    def generate(
        self,
        prompt: str = "",
        *,
        max_tokens: int = 0,
        ttft_s: float = 1.0,
        tds: float = 4.8,
        request_id: str | None = None,
        paced: bool = True,
        prompt_token_ids: Sequence[int] = (),
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        resume_from_index: int = 0,
        timeout_s: float | None = None,
    ) -> GenerationStream:
        """Start a generation (when iteration starts); ``max_tokens`` 0 means the gateway's
        default. ``request_id`` defaults to a fresh uuid so that :meth:`cancel` can name the
        request before its first token. ``resume_from_index`` > 0 reattaches to
        ``request_id``'s stream from that token on."""
        sampling = generation_pb2.SamplingParams(stop=list(stop), ignore_eos=ignore_eos)
        if temperature is not None:
            sampling.temperature = temperature
        if top_p is not None:
            sampling.top_p = top_p
        if seed is not None:
            sampling.seed = seed
        request = generation_pb2.GenerateRequest(
            request_id=request_id or uuid.uuid4().hex,
            prompt=prompt,
            prompt_token_ids=list(prompt_token_ids),
            max_tokens=max_tokens,
            sampling=sampling,
            qoe=generation_pb2.QoESpec(ttft_s=ttft_s, tds=tds),
            resume_from_index=resume_from_index,
        )
        return GenerationStream(
            self._service(), request, ttft_s=ttft_s, tds=tds, paced=paced,
            metadata=self._metadata, timeout_s=timeout_s,
        )

    async def cancel(self, request_id: str, *, timeout_s: float = 10.0) -> bool:
        """Stop ``request_id`` from any connection; True if it was live."""
        try:
            response = await self._service().Cancel(
                generation_pb2.CancelRequest(request_id=request_id),
                metadata=self._metadata, timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as err:
            raise _error(err) from err
        return bool(response.found)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> AsyncAndesClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class SyncGenerationStream(Iterator[TokenEvent]):
    """:class:`GenerationStream` for synchronous code (see :class:`AndesClient`)."""

    def __init__(self, client: AndesClient, stream: GenerationStream) -> None:
        self._client = client
        self.stream = stream

    def __next__(self) -> TokenEvent:
        try:
            return self._client._run(self.stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._client._run(self.stream.aclose())

    def __enter__(self) -> SyncGenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def request_id(self) -> str:
        return self.stream.request_id

    @property
    def qoe(self) -> float:
        return self.stream.qoe

    @property
    def ttft(self) -> float | None:
        return self.stream.ttft

    @property
    def finish_reason(self) -> str | None:
        return self.stream.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self.stream.usage

    @property
    def text(self) -> str:
        return self.stream.text


class AndesClient:
    """Synchronous client: an :class:`AsyncAndesClient` on a private event-loop thread (the
    same TLS options)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        api_key: str | None = None,
        *,
        tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        # First: bad TLS files raise before a thread exists.
        self._client = AsyncAndesClient(target, api_key, tls=tls, tls_ca=tls_ca,
                                        tls_cert=tls_cert, tls_key=tls_key)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="andes-client",
                                        daemon=True)
        self._thread.start()

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def generate(self, prompt: str = "", **options: Any) -> SyncGenerationStream:
        """Same options as :meth:`AsyncAndesClient.generate`."""

        async def create() -> GenerationStream:
            return self._client.generate(prompt, **options)

        return SyncGenerationStream(self, self._run(create()))

    def cancel(self, request_id: str, *, timeout_s: float = 10.0) -> bool:
        return self._run(self._client.cancel(request_id, timeout_s=timeout_s))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> AndesClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
