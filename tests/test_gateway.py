"""The gateway end to end over real sockets: real gRPC on 127.0.0.1, a real Redis.

The scheduler service is replaced by a small in-test ``SchedulerService`` whose SubmitBatch
plays the worker too: it writes the request's tokens into its Redis stream with
``andes.tokenstream.encode_chunk``, as a worker would. Requests whose id starts with ``hold``
get two chunks and then nothing more until they are aborted (then a CANCELLED final entry), so
tests can hold a stream open.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from andes.client import AndesClient, AndesError, AsyncAndesClient
from andes.tokenstream import TokenChunk, encode_chunk, payload_key, stream_key
from andes.v1 import generation_pb2, generation_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from gateway.auth import hash_key
from gateway.config import GatewayConfig, parse_config
from gateway.server import SERVICE_NAME, Gateway
from gateway.streams import StreamHub
from gateway.validation import Limits
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKENS_PER_CHUNK = 3
LENGTH = generation_pb2.FINISH_REASON_LENGTH
CANCELLED = generation_pb2.FINISH_REASON_CANCELLED


def _token_ids(start: int, end: int) -> tuple[int, ...]:
    return tuple(range(1000 + start, 1000 + end))


def _text(token_ids: tuple[int, ...]) -> str:
    return "".join(f" w{t}" for t in token_ids)


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """SubmitBatch records the requests and writes their tokens to Redis (the worker's job).

    ``hold_prefix``: requests whose id starts with it are held open until aborted (empty:
    none are, for tests whose ids are arbitrary).
    """

    def __init__(self, redis: aioredis.Redis, hold_prefix: str = "hold") -> None:
        self.redis = redis
        self.hold_prefix = hold_prefix
        self.submits: dict[str, scheduler_pb2.SubmitRequest] = {}
        self.batches: list[int] = []
        """Requests per SubmitBatch call."""
        self.aborts: list[tuple[str, str]] = []
        self.progress: list[scheduler_pb2.DeliveryProgress] = []
        self.produced: dict[str, int] = {}
        self.finished: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def SubmitBatch(
        self, request: scheduler_pb2.SubmitBatchRequest, context: Any
    ) -> scheduler_pb2.SubmitBatchResponse:
        self.batches.append(len(request.requests))
        for item in request.requests:
            self.submits[item.request_id] = item
            task = asyncio.create_task(self._produce(item))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return scheduler_pb2.SubmitBatchResponse(results=[
            scheduler_pb2.SubmitResult(worker_id="test-worker") for _ in request.requests])

    async def _produce(self, request: scheduler_pb2.SubmitRequest) -> None:
        hold = bool(self.hold_prefix) and request.request_id.startswith(self.hold_prefix)
        total = 2 * TOKENS_PER_CHUNK if hold else request.max_tokens
        for start in range(0, total, TOKENS_PER_CHUNK):
            ids = _token_ids(start, min(total, start + TOKENS_PER_CHUNK))
            last = not hold and start + TOKENS_PER_CHUNK >= total
            chunk = TokenChunk(start, ids, _text(ids), LENGTH if last else 0)
            await self.redis.xadd(request.token_stream_key, encode_chunk(chunk))  # type: ignore[arg-type]
            self.produced[request.request_id] = start + len(ids)
        if not hold:
            self.finished.add(request.request_id)

    async def Abort(
        self, request: scheduler_pb2.AbortRequest, context: Any
    ) -> scheduler_pb2.AbortResponse:
        self.aborts.append((request.request_id, request.reason))
        submitted = self.submits.get(request.request_id)
        if submitted is None or request.request_id in self.finished:
            return scheduler_pb2.AbortResponse(found=False)
        self.finished.add(request.request_id)
        end = self.produced.get(request.request_id, 0)
        final = TokenChunk(end, (), "", CANCELLED)
        await self.redis.xadd(submitted.token_stream_key, encode_chunk(final))  # type: ignore[arg-type]
        return scheduler_pb2.AbortResponse(found=True)

    async def ReportDelivery(
        self, request_iterator: AsyncIterator[scheduler_pb2.ReportDeliveryRequest], context: Any
    ) -> scheduler_pb2.ReportDeliveryResponse:
        received = 0
        async for batch in request_iterator:
            self.progress.extend(batch.progress)
            received += len(batch.progress)
        return scheduler_pb2.ReportDeliveryResponse(entries_received=received)

    def aborted(self, request_id: str) -> bool:
        return any(rid == request_id for rid, _ in self.aborts)


@dataclass
class Cluster:
    gateway: Gateway
    scheduler: FakeScheduler
    stub: Any
    channel: grpc.aio.Channel
    redis: aioredis.Redis
    prefix: str
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@asynccontextmanager
async def cluster(
    redis_url: str, hold_prefix: str = "hold", **config: Any
) -> AsyncIterator[Cluster]:
    """A fake scheduler and a real gateway on free ports, with a fresh key prefix."""
    redis = aioredis.from_url(redis_url)
    fake = FakeScheduler(redis, hold_prefix)
    scheduler_server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(fake, scheduler_server)  # type: ignore[no-untyped-call]
    scheduler_port = scheduler_server.add_insecure_port("127.0.0.1:0")
    await scheduler_server.start()
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    settings = GatewayConfig(
        listen="127.0.0.1:0", scheduler=f"127.0.0.1:{scheduler_port}", redis_url=redis_url,
        redis_prefix=prefix, report_interval_s=0.05,
    )
    registry = CollectorRegistry()
    gateway = Gateway(replace(settings, **config), registry=registry)
    address = await gateway.start()
    channel = grpc.aio.insecure_channel(address)
    stub = generation_pb2_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
    try:
        yield Cluster(gateway, fake, stub, channel, redis, prefix, registry)
    finally:
        await channel.close()
        await gateway.stop()
        await scheduler_server.stop(None)
        await redis.aclose()


TEST_BUDGET_S = 20.0


def run(coroutine: Any) -> Any:
    """Run a test body with a time budget (checked after the fact too: on Python 3.11 a
    cancellation can be swallowed by the code under test, and the body then just returns)."""
    started = time.monotonic()
    result = asyncio.run(asyncio.wait_for(coroutine, TEST_BUDGET_S))
    assert time.monotonic() - started < TEST_BUDGET_S, "the test body ran out of time"
    return result


async def _collect(call: Any) -> list[generation_pb2.GenerateResponse]:
    return [response async for response in call]


async def _read_rest(call: Any) -> list[generation_pb2.GenerateResponse]:
    """The remaining messages of a call already read with ``read()`` (the iterator and the
    read API cannot be mixed on one call)."""
    responses = []
    while (response := await call.read()) != grpc.aio.EOF:
        responses.append(response)
    return responses


async def _rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _collect(call)
    return caught.value


async def _until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def _check_contiguous(responses: list[generation_pb2.GenerateResponse], start: int = 0) -> int:
    position = start
    for response in responses:
        assert response.index == position, "message indices must be contiguous"
        position += len(response.token_ids)
    return position


# -- the happy path -------------------------------------------------------------------------------


def test_generate_streams_every_token(redis_url: str) -> None:
    async def body() -> None:
        async with cluster(redis_url) as c:
            request = generation_pb2.GenerateRequest(
                request_id="happy-1", prompt="Tell me a story about a dragon", max_tokens=10
            )
            responses = await _collect(c.stub.Generate(request, timeout=10))
            assert _check_contiguous(responses) == 10
            tokens = [t for r in responses for t in r.token_ids]
            assert tokens == list(_token_ids(0, 10))
            assert "".join(r.text for r in responses) == _text(_token_ids(0, 10))
            assert all(r.request_id == "happy-1" for r in responses)
            final = responses[-1]
            assert final.finish_reason == LENGTH
            assert all(r.finish_reason == 0 for r in responses[:-1])
            assert final.usage.completion_tokens == 10
            assert final.usage.prompt_tokens == math.ceil(len(request.prompt) / 4)

            submitted = c.scheduler.submits["happy-1"]
            assert submitted.max_tokens == 10 and submitted.gateway_id == c.gateway.gateway_id
            assert submitted.qoe.ttft_s == 1.0 and submitted.qoe.tds == pytest.approx(4.8)
            assert submitted.payload_key == payload_key("happy-1", c.prefix)
            assert submitted.token_stream_key == stream_key("happy-1", c.prefix)
            assert abs(submitted.arrival_unix_s - time.time()) < 10
            payload: dict[Any, Any] = await c.redis.hgetall(submitted.payload_key)
            assert payload[b"prompt"].decode() == request.prompt
            assert payload[b"max_tokens"] == b"10"
            assert 0 < await c.redis.ttl(submitted.payload_key) <= 600  # finished: short TTL

            # The delivery stream told the scheduler the client got all 10 tokens.
            def reported() -> bool:
                return any(p.request_id == "happy-1" and p.complete and p.delivered_tokens == 10
                           for p in c.scheduler.progress)

            await _until(reported)
            assert not c.scheduler.aborted("happy-1")
            assert c.metric("andes_requests_total", outcome="completed") == 1
            assert c.metric("andes_tokens_delivered_total") == 10
            assert c.metric("andes_request_qoe_count") == 1
            assert c.metric("andes_ttft_seconds_count") == 1
            assert c.metric("andes_active_streams") == 0

    run(body())


def test_generated_request_id_and_token_id_prompt(redis_url: str) -> None:
    async def body() -> None:
        async with cluster(redis_url) as c:
            request = generation_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=4)
            responses = await _collect(c.stub.Generate(request, timeout=10))
            request_id = responses[0].request_id
            assert len(request_id) == 32 and all(r.request_id == request_id for r in responses)
            assert responses[-1].usage.prompt_tokens == 3
            assert _check_contiguous(responses) == 4

    run(body())


# -- errors ---------------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"prompt": ""}, "prompt"),
    ({"prompt_token_ids": [1, 2]}, "prompt_token_ids"),
    ({"prompt": "x" * 101}, "prompt"),
    ({"max_tokens": 51}, "max_tokens"),
    ({"qoe": generation_pb2.QoESpec(ttft_s=math.nan)}, "qoe.ttft_s"),
    ({"qoe": generation_pb2.QoESpec(tds=-1.0)}, "qoe.tds"),
    ({"sampling": generation_pb2.SamplingParams(temperature=-1.0)}, "sampling.temperature"),
    ({"sampling": generation_pb2.SamplingParams(top_p=1.5)}, "sampling.top_p"),
    ({"sampling": generation_pb2.SamplingParams(stop=[""])}, "sampling.stop[0]"),
    ({"request_id": "no spaces please"}, "request_id"),
    ({"request_id": "x" * 129}, "request_id"),
    ({"resume_from_index": 2}, "resume_from_index"),
]


def test_every_bad_field_is_invalid_argument_and_the_server_keeps_serving(redis_url: str) -> None:
    limits = Limits(max_tokens_limit=50, default_max_tokens=8, max_prompt_chars=100)

    async def body() -> None:
        async with cluster(redis_url, limits=limits) as c:
            for fields, name in BAD_REQUESTS:
                values: dict[str, Any] = {"prompt": "hi"}
                values.update(fields)
                request = generation_pb2.GenerateRequest(**values)
                error = await _rpc_error(c.stub.Generate(request, timeout=10))
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
                assert (error.details() or "").startswith(f"{name}: "), error.details()
            assert not c.scheduler.submits, "nothing invalid may reach the scheduler"
            assert c.metric("andes_requests_total", outcome="invalid") == len(BAD_REQUESTS)
            good = generation_pb2.GenerateRequest(prompt="hi")  # max_tokens 0: the default 8
            responses = await _collect(c.stub.Generate(good, timeout=10))
            assert _check_contiguous(responses) == 8

    run(body())


def test_api_key_is_required_when_configured(redis_url: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# gateway keys\n{hash_key('s3cret')}\n\n")

    async def body() -> None:
        async with cluster(redis_url, api_keys_file=str(keys)) as c:
            request = generation_pb2.GenerateRequest(prompt="hi", max_tokens=3)
            for metadata in [(), (("authorization", "Bearer wrong"),),
                             (("authorization", "s3cret"),)]:
                error = await _rpc_error(c.stub.Generate(request, metadata=metadata, timeout=10))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            cancel = c.stub.Cancel(generation_pb2.CancelRequest(request_id="x"), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await cancel
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", "Bearer s3cret"),)
            responses = await _collect(c.stub.Generate(request, metadata=good, timeout=10))
            assert _check_contiguous(responses) == 3

            client = AsyncAndesClient(c.gateway.address, api_key="s3cret")
            stream = client.generate("hi", max_tokens=3, paced=False)
            assert sum([len(e.token_ids) async for e in stream]) == 3
            await client.close()

    run(body())


def test_stream_limit_is_resource_exhausted(redis_url: str) -> None:
    async def body() -> None:
        async with cluster(redis_url, max_streams=1) as c:
            held = c.stub.Generate(
                generation_pb2.GenerateRequest(request_id="hold-limit", prompt="hi"), timeout=10
            )
            first = await held.read()
            assert first.index == 0
            error = await _rpc_error(c.stub.Generate(
                generation_pb2.GenerateRequest(prompt="hi", max_tokens=3), timeout=10
            ))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.metric("andes_requests_total", outcome="rejected") == 1
            held.cancel()
            await _until(lambda: c.gateway.service.active_streams == 0)
            responses = await _collect(c.stub.Generate(
                generation_pb2.GenerateRequest(prompt="hi", max_tokens=3), timeout=10
            ))
            assert _check_contiguous(responses) == 3

    run(body())


def test_duplicate_live_request_id_is_already_exists(redis_url: str) -> None:
    async def body() -> None:
        async with cluster(redis_url) as c:
            request = generation_pb2.GenerateRequest(request_id="hold-dup", prompt="hi")
            held = c.stub.Generate(request, timeout=10)
            await held.read()
            error = await _rpc_error(c.stub.Generate(request, timeout=10))
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "request_id" in (error.details() or "")
            held.cancel()

    run(body())


def test_resume_of_unknown_request_is_not_found(redis_url: str) -> None:
    async def body() -> None:
        async with cluster(redis_url) as c:
            request = generation_pb2.GenerateRequest(request_id="nobody", resume_from_index=3)
            error = await _rpc_error(c.stub.Generate(request, timeout=10))
            assert error.code() == grpc.StatusCode.NOT_FOUND

    run(body())


# -- cancellation ---------------------------------------------------------------------------------


def test_client_cancel_aborts_the_request_on_the_scheduler(redis_url: str) -> None:
    async def body() -> None:
        async with cluster(redis_url) as c:
            call = c.stub.Generate(
                generation_pb2.GenerateRequest(request_id="hold-gone", prompt="hi"), timeout=10
            )
            first = await call.read()
            assert list(first.token_ids)
            call.cancel()
            await _until(lambda: c.scheduler.aborted("hold-gone"))
            reason = dict(c.scheduler.aborts)["hold-gone"]
            assert "disconnected" in reason
            await _until(lambda: c.gateway.service.active_streams == 0)
            await _until(lambda: any(p.request_id == "hold-gone" and p.complete
                                     for p in c.scheduler.progress))
            assert c.metric("andes_requests_total", outcome="disconnected") == 1
            assert len(c.scheduler.aborts) == 1, "one Abort per request"

    run(body())


def test_deadline_aborts_the_request(redis_url: str) -> None:
    async def body() -> None:
        async with cluster(redis_url) as c:
            call = c.stub.Generate(
                generation_pb2.GenerateRequest(request_id="hold-late", prompt="hi"), timeout=0.8
            )
            error = await _rpc_error(call)
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await _until(lambda: c.scheduler.aborted("hold-late"))

    run(body())


def test_cancel_rpc_ends_the_stream_with_cancelled(redis_url: str) -> None:
    async def body() -> None:
        async with cluster(redis_url) as c:
            call = c.stub.Generate(
                generation_pb2.GenerateRequest(request_id="hold-cancel", prompt="hi"), timeout=10
            )
            responses = [await call.read()]
            response = await c.stub.Cancel(
                generation_pb2.CancelRequest(request_id="hold-cancel"), timeout=10
            )
            assert response.found
            responses += await _read_rest(call)
            assert responses[-1].finish_reason == CANCELLED
            assert responses[-1].usage.completion_tokens == _check_contiguous(responses)
            assert c.scheduler.aborted("hold-cancel")
            again = await c.stub.Cancel(
                generation_pb2.CancelRequest(request_id="hold-cancel"), timeout=10
            )
            assert not again.found, "cancelling twice is fine and finds nothing"
            unknown = await c.stub.Cancel(
                generation_pb2.CancelRequest(request_id="never-was"), timeout=10
            )
            assert not unknown.found
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await c.stub.Cancel(generation_pb2.CancelRequest(request_id="bad id"),
                                    timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    run(body())


# -- resume, health, drain ------------------------------------------------------------------------


def test_resume_from_index_returns_the_rest(redis_url: str) -> None:
    async def body() -> None:
        async with cluster(redis_url) as c:
            request = generation_pb2.GenerateRequest(request_id="again", prompt="hi",
                                                     max_tokens=10)
            whole = await _collect(c.stub.Generate(request, timeout=10))
            for start in (4, 6, 10):
                resume = generation_pb2.GenerateRequest(request_id="again",
                                                        resume_from_index=start)
                rest = await _collect(c.stub.Generate(resume, timeout=10))
                assert rest[0].index == start
                assert _check_contiguous(rest, start) == 10
                assert [t for r in rest for t in r.token_ids] == list(_token_ids(start, 10))
                assert rest[-1].finish_reason == LENGTH
                assert rest[-1].usage.completion_tokens == 10
            past = generation_pb2.GenerateRequest(request_id="again", resume_from_index=11)
            error = await _rpc_error(c.stub.Generate(past, timeout=10))
            assert error.code() == grpc.StatusCode.OUT_OF_RANGE
            # Far past the end: refused before any per-token work (no memory blow-up).
            for huge in (10**9, 2**64 - 1):
                far = generation_pb2.GenerateRequest(request_id="again", resume_from_index=huge)
                error = await _rpc_error(c.stub.Generate(far, timeout=10))
                assert error.code() == grpc.StatusCode.OUT_OF_RANGE
                assert "max_tokens 10" in (error.details() or "")
            assert len(c.scheduler.submits) == 1, "resuming starts no new generation"
            assert whole[-1].usage.completion_tokens == 10

    run(body())


def test_health_serving_then_not_serving_while_draining(redis_url: str) -> None:
    async def body() -> None:
        async with cluster(redis_url) as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            for service in ("", SERVICE_NAME):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service),
                                           timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            held = c.stub.Generate(
                generation_pb2.GenerateRequest(request_id="hold-drain", prompt="hi"), timeout=10
            )
            await held.read()
            await c.gateway.begin_drain()
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                       timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            error = await _rpc_error(c.stub.Generate(
                generation_pb2.GenerateRequest(prompt="hi"), timeout=10
            ))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            # The stream in progress is still served: cancelling it works as usual.
            cancelled = await c.stub.Cancel(
                generation_pb2.CancelRequest(request_id="hold-drain"), timeout=10
            )
            assert cancelled.found
            rest = await _read_rest(held)
            assert rest[-1].finish_reason == CANCELLED
            assert await c.gateway.wait_idle(5)

    run(body())


# -- the client SDK -------------------------------------------------------------------------------


def test_sdk_paced_stream_never_shows_tokens_faster_than_tds(redis_url: str) -> None:
    tds = 25.0

    async def body() -> None:
        async with cluster(redis_url) as c:
            async with AsyncAndesClient(c.gateway.address) as client:
                stream = client.generate("hi", max_tokens=9, tds=tds, ttft_s=1.0)
                events = []
                handed = []
                async for event in stream:
                    handed.append(time.monotonic())
                    events.append(event)
            assert [e.index for e in events] == list(range(9))
            assert [e.token_id for e in events] == list(_token_ids(0, 9))
            assert "".join(e.text for e in events) == _text(_token_ids(0, 9))
            shown = [e.shown_at for e in events]
            gaps = [b - a for a, b in itertools.pairwise(shown)]
            assert min(gaps) >= 1 / tds - 1e-9, gaps
            assert all(e.shown_at >= e.received_at for e in events)
            assert all(h >= e.shown_at - 1e-3 for h, e in zip(handed, events, strict=True))
            assert stream.finish_reason == "length"
            assert stream.usage is not None and stream.usage.completion_tokens == 9
            assert stream.ttft is not None and stream.ttft < 5
            assert 0.0 <= stream.qoe <= 1.0
            assert stream.qoe == pytest.approx(1.0)  # local and instant: on time

    run(body())


def test_sdk_raw_stream_and_cancel(redis_url: str) -> None:
    async def body() -> None:
        async with cluster(redis_url) as c, AsyncAndesClient(c.gateway.address) as client:
            stream = client.generate("hi", max_tokens=7, paced=False)
            events = [event async for event in stream]
            assert sum(len(e.token_ids) for e in events) == 7
            assert all(e.shown_at == e.received_at for e in events)
            assert stream.text == _text(_token_ids(0, 7))

            held = client.generate("hi", request_id="hold-sdk", paced=False)
            first = await held.__anext__()
            assert first.index == 0
            assert await client.cancel("hold-sdk")
            rest = [event async for event in held]
            assert held.finish_reason == "cancelled"
            assert sum(len(e.token_ids) for e in [first, *rest]) == 6

    run(body())


def test_sync_client_and_the_generate_command(redis_url: str) -> None:
    def sync_generation(address: str) -> tuple[list[int], float, str | None]:
        with AndesClient(address) as client:
            stream = client.generate("hi", max_tokens=5, tds=100.0)
            indices = [event.index for event in stream]
            with pytest.raises(AndesError) as caught:
                list(client.generate("", max_tokens=5))
            assert caught.value.code == "INVALID_ARGUMENT"
            return indices, stream.qoe, stream.finish_reason

    async def body() -> None:
        async with cluster(redis_url) as c:
            indices, qoe, finish = await asyncio.to_thread(sync_generation, c.gateway.address)
            assert indices == list(range(5)) and finish == "length" and 0 <= qoe <= 1
            for pacing in ([], ["--no-pace"]):
                command = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "andes", "generate", "hi", "--target",
                    c.gateway.address, "--max-tokens", "5", "--tds", "100", *pacing,
                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )
                out, err = await command.communicate()
                assert command.returncode == 0, err.decode()
                assert out.decode() == _text(_token_ids(0, 5)) + "\n"
                assert err.decode().startswith("QoE ") and "finish length" in err.decode()

    run(body())


# -- the stream hub under many streams and a slow consumer ---------------------------------------


def test_stream_hub_fans_many_streams_through_few_readers(redis_url: str) -> None:
    async def body() -> None:
        redis = aioredis.from_url(redis_url)
        prefix = f"hub-{uuid.uuid4().hex[:8]}"
        hub = StreamHub(redis, f"{prefix}:wake", keys_per_reader=50, queue_size=2,
                        block_ms=4000)
        keys = [stream_key(f"r{i}", prefix) for i in range(200)]
        subscriptions = [await hub.subscribe(key) for key in keys]
        assert hub.readers == 4 and hub.started == 0
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                for start in range(0, 12, TOKENS_PER_CHUNK):
                    ids = _token_ids(start, start + TOKENS_PER_CHUNK)
                    final = LENGTH if start + TOKENS_PER_CHUNK == 12 else 0
                    pipe.xadd(key, encode_chunk(TokenChunk(start, ids, "", final)))  # type: ignore[arg-type]
            await pipe.execute()
        # Each stream moves to a started reader with its first entries: four more readers.
        await _until(lambda: hub.started == len(keys))
        assert hub.readers == 8
        for subscription in subscriptions:  # read slowly: queues fill, readers back off
            seen: list[int] = []
            while True:
                chunk = await asyncio.wait_for(subscription.get(), 5)
                seen.extend(chunk.token_ids)
                if chunk.finish_reason:
                    break
            assert seen == list(_token_ids(0, 12))
            subscription.close()
        late = await hub.subscribe(keys[0], from_index=7)
        chunk = await asyncio.wait_for(late.get(), 5)
        assert chunk.index == 7 and chunk.token_ids == _token_ids(7, 9)

        # A reader blocked in XREAD (for 4 s) picks a new stream up at once: the wake-up.
        idle = await hub.subscribe(stream_key("idle", prefix))
        await asyncio.sleep(0.3)
        fresh_key = stream_key("fresh", prefix)
        fresh = await hub.subscribe(fresh_key)
        await redis.xadd(fresh_key, encode_chunk(TokenChunk(0, (1,), "a", LENGTH)))  # type: ignore[arg-type]
        assert (await asyncio.wait_for(fresh.get(), 1.0)).token_ids == (1,)
        idle.close()
        keys.append(fresh_key)
        await hub.close()
        # A stream that begins while the hub closes stays where closing fails it.
        hub.start(idle._feed)
        readers_after_close = hub.readers
        await hub.close()  # stops a reader start() might have made
        assert readers_after_close == 0
        await redis.delete(*keys)
        await redis.aclose()

    run(body())


# -- configuration and the process ----------------------------------------------------------------


def test_flags_default_from_the_environment() -> None:
    env = {"ANDES_GATEWAY_LISTEN": "127.0.0.1:6000", "ANDES_SCHEDULER_ADDR": "10.0.0.1:7",
           "ANDES_REDIS_URL": "redis://r:1/2", "ANDES_REDIS_PREFIX": "p",
           "ANDES_GATEWAY_MAX_STREAMS": "9"}
    config = parse_config([], env)
    assert (config.listen, config.scheduler, config.redis_url, config.redis_prefix) == (
        "127.0.0.1:6000", "10.0.0.1:7", "redis://r:1/2", "p")
    assert config.max_streams == 9
    assert parse_config(["--max-streams", "3"], env).max_streams == 3
    with pytest.raises(SystemExit):
        parse_config(["--max-streams", "0"], {})


def test_python_m_gateway_serves_and_drains_on_sigterm(redis_url: str) -> None:
    """The real process (uvloop): READY line, health, a request whose scheduler is down gets
    UNAVAILABLE, /metrics counts it, SIGTERM exits cleanly."""
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "ANDES_REDIS_URL": redis_url, "ANDES_SCHEDULER_ADDR": "127.0.0.1:1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--listen", f"127.0.0.1:{port}",
         "--drain-seconds", "5", "--metrics-port", str(metrics_port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip() == f"READY gateway 127.0.0.1:{port}"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = generation_pb2_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(generation_pb2.GenerateRequest(prompt="hi"), timeout=5))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
            text = page.read().decode()
        assert 'andes_requests_total{outcome="unavailable"} 1.0' in text
        assert "andes_active_streams 0.0" in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
