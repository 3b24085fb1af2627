"""Clients that leave: a disconnect or a passed deadline cancels the generation and frees its
KV cache on the worker; cancelling is idempotent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from andes.up import ClusterConfig, LocalCluster
from andes.v1 import generation_pb2, generation_pb2_grpc
from tests.chaos.support import metric_value, restartable_redis, scale, sim_request, wait_for
from tests.conftest import free_port

STREAMS = scale(16, 64)


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, int, int]]:
    worker_metrics, scheduler_metrics = free_port(), free_port()
    with restartable_redis(str(tmp_path)) as redis:
        config = ClusterConfig(
            backend="sim", workers=1, policy="andes", profile="a100-opt13b",
            gateway_port=free_port(), scheduler_port=free_port(), redis_url=redis.url,
            worker_args=("--metrics-port", str(worker_metrics)),
            scheduler_args=("--metrics-port", str(scheduler_metrics)),
        )
        with LocalCluster(config, log_dir=tmp_path) as running:
            yield running, worker_metrics, scheduler_metrics


async def _leave_after_tokens(stub: generation_pb2_grpc.GenerationServiceStub, rid: str,
                              tokens: int) -> int:
    """Read ``tokens`` tokens of a long response, then drop the call (a disconnect)."""
    call = stub.Generate(sim_request(rid, 2000))
    seen = 0
    async for message in call:
        seen += len(message.token_ids)
        if seen >= tokens:
            call.cancel()
            break
    return seen


async def _until_deadline(stub: generation_pb2_grpc.GenerationServiceStub, rid: str) -> str:
    try:
        async for _ in stub.Generate(sim_request(rid, 2000), timeout=1.0):
            pass
    except grpc.aio.AioRpcError as err:
        return err.code().name
    return "OK"


def test_disconnects_and_deadlines_free_every_kv_block(
    cluster: tuple[LocalCluster, int, int],
) -> None:
    running, worker_metrics, _ = cluster

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(running.gateway_addr) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
            left = asyncio.gather(*(_leave_after_tokens(stub, f"leave-{i}", 10)
                                    for i in range(STREAMS)))
            timed = asyncio.gather(*(_until_deadline(stub, f"late-{i}")
                                     for i in range(STREAMS)))
            await wait_for(lambda: metric_value(worker_metrics, "andes_kv_blocks_used") > 0,
                           30.0, "the requests hold KV")
            seen, codes = await asyncio.gather(left, timed)
            assert all(count >= 10 for count in seen)
            assert set(codes) == {"DEADLINE_EXCEEDED"}, codes
            # Nothing is left running: KV free on the worker, no request on the scheduler.
            freed_s = await wait_for(
                lambda: metric_value(worker_metrics, "andes_kv_blocks_used") == 0.0,
                10.0, "the worker frees the KV of abandoned requests")
            print(f"KV freed {freed_s:.3f} s after the last client left")

    asyncio.run(scenario())


def test_cancel_is_idempotent(cluster: tuple[LocalCluster, int, int]) -> None:
    running, worker_metrics, _ = cluster

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(running.gateway_addr) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
            call = stub.Generate(sim_request("cancel-twice", 2000))
            first = await call.read()
            assert first.token_ids
            answers = [await stub.Cancel(generation_pb2.CancelRequest(request_id="cancel-twice"))
                       for _ in range(3)]
            assert answers[0].found
            assert not any(a.found for a in answers[1:])
            last = first
            while (message := await call.read()) is not grpc.aio.EOF:
                last = message
            assert last.finish_reason == generation_pb2.FINISH_REASON_CANCELLED
            unknown = await stub.Cancel(generation_pb2.CancelRequest(request_id="never-was"))
            assert not unknown.found
            await wait_for(lambda: metric_value(worker_metrics, "andes_kv_blocks_used") == 0.0,
                           10.0, "the cancelled request's KV is freed")

    asyncio.run(scenario())
