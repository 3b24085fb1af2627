"""A burst of new streams: a real gateway accepts every one, or refuses it with a status.

grpc.aio accepts calls one at a time from its event loop, so thousands of streams opened at
once queue inside grpc-core until the gateway's loop gets to them. With grpc-core's default
limits on that queue (random drops from 1,000 calls waiting, all from 3,000) a share of them
was killed before the gateway ever saw them: the client got a bare CANCELLED with no tokens and
the gateway could neither log nor count it (see :func:`gateway.server.pending_call_options`).

The burst comes from a separate client process (:mod:`tests.burst_client`), over several
connections, against a real gateway with the in-test fake scheduler of
:mod:`tests.test_gateway` and a real Redis.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from gateway.grpc_events import NotificationDrain
from gateway.server import pending_call_options
from tests.test_gateway import cluster

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 60.0


async def _burst(address: str, streams: int, channels: int, max_tokens: int) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.burst_client", address, str(streams), str(channels),
        str(max_tokens), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0, "the burst client failed"
    result: dict[str, Any] = json.loads(out)
    return result


def test_a_burst_of_2000_streams_is_served_without_a_single_cancelled(redis_url: str) -> None:
    streams, max_tokens = 2000, 6

    async def body() -> tuple[dict[str, Any], float]:
        async with cluster(redis_url, hold_prefix="") as c:
            # grpc.aio's events reach the loop unthrottled (a grpc upgrade that changes its
            # internals shows here first).
            assert c.gateway.drains_grpc_notifications
            result = await _burst(c.gateway.address, streams, 8, max_tokens)
            return result, c.metric("andes_requests_total", outcome="completed")

    started = time.monotonic()
    result, completed = asyncio.run(asyncio.wait_for(body(), BUDGET_S))
    assert time.monotonic() - started < BUDGET_S
    # The client cancels nothing: a CANCELLED could only be the server dropping a stream.
    assert result["statuses"] == {"OK": streams}, result["details"]
    assert result["broken"] == 0
    assert completed == streams  # and the gateway saw every one of them


def test_every_connection_is_served_whichever_server_of_the_port_takes_it(
    redis_url: str,
) -> None:
    """The gateway's gRPC servers share its port (``--grpc-acceptors``) and the kernel hands
    each new connection to one of them: every one serves generation, health and reflection."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from andes.v1 import generation_pb2, generation_pb2_grpc

    async def one_connection(address: str) -> tuple[int, int, int]:
        async with grpc.aio.insecure_channel(address) as channel:
            health_stub = health_pb2_grpc.HealthStub(channel)
            status = await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            stub = generation_pb2_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
            request = generation_pb2.GenerateRequest(prompt="hi", max_tokens=3)
            tokens = sum([len(r.token_ids) async for r in stub.Generate(request, timeout=10)])
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = [a async for a in reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)]
            return status.status, tokens, len(answers[0].list_services_response.service)

    async def body() -> list[tuple[int, int, int]]:
        async with cluster(redis_url, hold_prefix="", grpc_acceptors=4) as c:
            return await asyncio.gather(*(one_connection(c.gateway.address) for _ in range(24)))

    results = asyncio.run(asyncio.wait_for(body(), BUDGET_S))
    assert results == [(health_pb2.HealthCheckResponse.SERVING, 3, 3)] * 24


def test_the_queue_of_calls_not_yet_accepted_holds_twice_the_stream_limit() -> None:
    options = dict(pending_call_options(4096))
    assert options["grpc.server.max_pending_requests"] == 8192
    assert options["grpc.server.max_pending_requests_hard_limit"] == 8192
    # Never below grpc-core's own hard limit, whatever the stream limit.
    assert min(dict(pending_call_options(10))[name] for name in (
        "grpc.server.max_pending_requests", "grpc.server.max_pending_requests_hard_limit")) >= 3000
    # A call waits there longer than grpc-core's 30 s before it is dropped.
    assert options["grpc.server_max_unrequested_time_in_server"] >= 300


def test_the_notification_drain_leaves_grpc_exactly_one_byte() -> None:
    """grpc's reader reads one byte per call and must find it; the drain reads the rest."""

    async def body() -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        drain = NotificationDrain(asyncio.get_running_loop(), reader)
        try:
            writer.send(b"1" * 300)  # 300 events queued: more than the buffer's 280 writes
            await asyncio.sleep(0.05)
            assert reader.recv(10) == b"1"  # left for grpc's reader, and only that
            writer.send(b"1")
            await asyncio.sleep(0.05)
            assert reader.recv(10) == b"1"  # a lone byte is grpc's too
            writer.close()  # grpc shut down: the drain removes itself
            await asyncio.sleep(0.05)
            assert drain.closed
        finally:
            drain.close()
            reader.close()

    asyncio.run(body())
