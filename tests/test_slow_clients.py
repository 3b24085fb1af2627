"""Clients that never read: the gateway's memory for them stays bounded, other streams flow, and
``--stalled-client-timeout-s`` ends them (over real sockets, the fake-scheduler gateway of
``tests/test_gateway.py``).

The test is the worker here: a ``hold`` request gets its first two chunks from the fake
scheduler, then the test floods its token stream with far more than the client's and the
kernel's buffers take (megabytes), while the client reads nothing. The bound is checked on the
gateway's stream hub (chunks queued for the request, and the most any queue ever held), not on
time or process memory.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import grpc
import pytest

from andes.tokenstream import TokenChunk, encode_chunk, stream_key
from andes.v1 import generation_pb2
from tests.test_gateway import (
    TOKENS_PER_CHUNK,
    Cluster,
    _check_contiguous,
    _collect,
    _until,
    cluster,
    run,
)

FLOOD_CHUNKS = 3000
CHUNK_TEXT = "x" * 4096
"""3000 chunks of 4 KiB: 12 MiB, well past an HTTP/2 window grown by BDP probing (4 MiB) and
loopback socket buffers."""


async def flood(c: Cluster, request_id: str) -> int:
    """Append FLOOD_CHUNKS chunks after the two a ``hold`` request got; the index after them."""
    key = stream_key(request_id, c.prefix)
    await _until(lambda: c.scheduler.produced.get(request_id) == 2 * TOKENS_PER_CHUNK)
    start = 2 * TOKENS_PER_CHUNK
    for batch in range(0, FLOOD_CHUNKS, 100):
        async with c.redis.pipeline(transaction=False) as pipe:
            for i in range(batch, batch + 100):
                index = start + i * TOKENS_PER_CHUNK
                ids = tuple(range(index, index + TOKENS_PER_CHUNK))
                pipe.xadd(key, encode_chunk(TokenChunk(index, ids, CHUNK_TEXT, 0)))  # type: ignore[arg-type]
            await pipe.execute()
    end = start + FLOOD_CHUNKS * TOKENS_PER_CHUNK
    c.scheduler.produced[request_id] = end  # where the fake scheduler's Abort appends its end
    return end


async def assert_bounded_while_others_flow(c: Cluster, request_id: str, end: int) -> None:
    """The stalled request's queue is full and its key paused; no queue ever held more than
    ``queue_size`` chunks; Redis keeps the rest; a fresh request meanwhile streams fully."""
    hub = c.gateway.service.hub
    key = stream_key(request_id, c.prefix)
    await _until(lambda: hub.paused == 1 and hub.backlog(key) == hub.queue_size, 15)
    assert hub.peak_queued <= hub.queue_size
    assert await c.redis.xlen(key) == 2 + FLOOD_CHUNKS, "the entries wait in Redis"
    delivered = max((p.delivered_tokens for p in c.scheduler.progress
                     if p.request_id == request_id), default=0)
    assert delivered < end / 2, "the client took far less than was produced"

    other = generation_pb2.GenerateRequest(request_id="flowing", prompt="hi", max_tokens=30)
    responses = await _collect(c.stub.Generate(other, timeout=10))
    assert _check_contiguous(responses) == 30
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert hub.backlog(key) == hub.queue_size and hub.peak_queued <= hub.queue_size


# -- the two front ends' never-reading clients ----------------------------------------------------

Stall = Callable[[Cluster, str], AbstractAsyncContextManager[None]]
"""Opens a request as a client that never reads, for the duration of the block."""


@asynccontextmanager
async def grpc_client_never_reading(c: Cluster, request_id: str) -> AsyncIterator[None]:
    request = generation_pb2.GenerateRequest(request_id=request_id, prompt="hi")
    call = c.stub.Generate(request, timeout=60)  # starts at once; nothing ever reads it
    try:
        yield
    finally:
        call.cancel()


@asynccontextmanager
async def http_client_never_reading(c: Cluster, request_id: str) -> AsyncIterator[None]:
    """A raw socket with a small receive buffer that sends a streamed completion and never
    calls recv."""
    host, port = c.gateway.http_address.rsplit(":", 1)
    body = json.dumps({"prompt": "hi", "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nx-request-id: {request_id}\r\n\r\n").encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(sock, head + body)
        yield
    finally:
        sock.close()


FRONT_ENDS: list[tuple[str, Stall]] = [("grpc", grpc_client_never_reading),
                                       ("http", http_client_never_reading)]


@pytest.mark.parametrize("stall", [s for _, s in FRONT_ENDS], ids=[n for n, _ in FRONT_ENDS])
def test_a_never_reading_client_holds_a_bounded_backlog(redis_url: str, stall: Stall) -> None:
    """Without a stall timeout the stream stays open, paused; the client leaving aborts it."""

    async def body() -> None:
        async with cluster(redis_url, http_listen="127.0.0.1:0") as c:
            async with stall(c, "hold-stalled"):
                end = await flood(c, "hold-stalled")
                await assert_bounded_while_others_flow(c, "hold-stalled", end)
                assert not c.scheduler.aborted("hold-stalled")
                assert c.gateway.service.active_streams == 1
            await _until(lambda: c.scheduler.aborted("hold-stalled"))
            await _until(lambda: c.gateway.service.active_streams == 0)
            assert c.metric("andes_requests_total", outcome="disconnected") == 1

    run(body())


@pytest.mark.parametrize("stall", [s for _, s in FRONT_ENDS], ids=[n for n, _ in FRONT_ENDS])
def test_stalled_client_timeout_aborts_the_request(redis_url: str, stall: Stall) -> None:
    async def body() -> None:
        async with cluster(redis_url, http_listen="127.0.0.1:0",
                           stalled_client_timeout_s=1.0) as c:
            async with stall(c, "hold-timeout"):
                await flood(c, "hold-timeout")
                await _until(lambda: c.scheduler.aborted("hold-timeout"), 15)
                reason = dict(c.scheduler.aborts)["hold-timeout"]
                assert "stalled client" in reason, reason
                await _until(lambda: c.gateway.service.active_streams == 0)
                assert c.gateway.service.hub.peak_queued <= c.gateway.service.hub.queue_size
                assert c.metric("andes_requests_total", outcome="stalled") == 1
            # A client that reads is never affected by the timeout.
            other = generation_pb2.GenerateRequest(prompt="hi", max_tokens=30)
            assert _check_contiguous(await _collect(c.stub.Generate(other, timeout=10))) == 30

    run(body())


def test_a_stalled_grpc_client_reading_at_last_gets_its_messages_then_the_reason(
    redis_url: str,
) -> None:
    async def body() -> None:
        async with cluster(redis_url, stalled_client_timeout_s=1.0) as c:
            request = generation_pb2.GenerateRequest(request_id="hold-late-reader", prompt="hi")
            call = c.stub.Generate(request, timeout=60)
            await flood(c, "hold-late-reader")
            await _until(lambda: c.scheduler.aborted("hold-late-reader"), 15)
            position = 0
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for response in call:
                    assert response.index == position
                    position += len(response.token_ids)
            assert position > 0
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "stalled client" in (caught.value.details() or "")

    run(body())
