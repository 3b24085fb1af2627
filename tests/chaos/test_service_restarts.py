"""The scheduler, a gateway or Redis fails while streams are under way.

* The scheduler is killed and started again: workers go on with their last plan, gateways
  and workers reconnect with backoff, the new scheduler rebuilds its request table from the
  workers' registrations; every stream completes.
* A gateway is killed and started again: each client reattaches with its ``request_id`` and
  ``resume_from_index`` and receives the rest of its response.
* Redis is unreachable for a while (paused), or crashes and comes back empty: producers and
  consumers reconnect; a stream either completes intact or ends with UNAVAILABLE / DATA_LOSS
  naming the request, never silently cut; new requests work within seconds of its return.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from andes.up import ClusterConfig, LocalCluster
from loadgen.reattach import Received, follow
from tests.chaos.support import (
    RestartableRedis,
    assert_all_complete,
    assert_sim_text,
    restartable_redis,
    scale,
    sim_request,
)
from tests.conftest import free_port

STREAMS = scale(24, 120)
TOKENS = scale(160, 400)


@pytest.fixture()
def redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    with restartable_redis(str(tmp_path)) as server:
        yield server


@pytest.fixture()
def cluster(tmp_path: Path, redis: RestartableRedis) -> Iterator[LocalCluster]:
    config = ClusterConfig(
        backend="sim", workers=2, policy="andes", profile="a100-opt13b",
        gateway_port=free_port(), scheduler_port=free_port(), redis_url=redis.url,
    )
    with LocalCluster(config, log_dir=tmp_path) as running:
        yield running


async def streams_through(
    cluster: LocalCluster, prefix: str, fault: Callable[[], Awaitable[None]]
) -> list[Received]:
    tasks = [
        asyncio.create_task(follow(cluster.gateway_addr, sim_request(f"{prefix}-{i}", TOKENS)))
        for i in range(STREAMS)
    ]
    await asyncio.sleep(1.5)  # every stream is admitted and under way
    await fault()
    return list(await asyncio.gather(*tasks))


async def first_success_after(cluster: LocalCluster, prefix: str, limit_s: float) -> float:
    """Seconds until a new request streams to its end (tries one after another)."""
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        received = await follow(cluster.gateway_addr, sim_request(f"{prefix}-{attempt}", 8),
                                reattach_for_s=0.0)
        if received.complete:
            return time.monotonic() - start
        assert time.monotonic() - start < limit_s, received.describe()
        await asyncio.sleep(0.05)


def test_scheduler_restart_loses_nothing(cluster: LocalCluster) -> None:
    async def restart_scheduler() -> None:
        cluster.kill("scheduler")
        await asyncio.sleep(1.0)  # workers and the gateway lose it and retry meanwhile
        cluster.restart("scheduler")

    results = asyncio.run(streams_through(cluster, "sched", restart_scheduler))
    assert_all_complete(results)
    assert_sim_text(results)
    assert all(r.attachments == 1 for r in results)  # the clients never noticed
    assert asyncio.run(first_success_after(cluster, "after-sched", 10.0)) >= 0


def test_gateway_restart_clients_reattach_and_get_the_rest(cluster: LocalCluster) -> None:
    async def restart_gateway() -> None:
        cluster.kill("gateway")
        await asyncio.sleep(0.5)
        cluster.restart("gateway")

    results = asyncio.run(streams_through(cluster, "gw", restart_gateway))
    assert_all_complete(results)
    assert_sim_text(results)
    reattached = [r for r in results if r.attachments > 1]
    assert reattached, "no stream was cut by the gateway's death"
    assert all(set(r.interruptions) <= {"UNAVAILABLE"} for r in results)


def test_redis_unreachable_for_seconds_loses_nothing(
    cluster: LocalCluster, redis: RestartableRedis
) -> None:
    outage_s = scale(4, 10)
    back: list[float] = []

    async def pause_redis() -> None:
        redis.pause()
        await asyncio.sleep(outage_s)
        redis.resume()
        back.append(await first_success_after(cluster, "after-pause", 5.0))

    results = asyncio.run(streams_through(cluster, "pause", pause_redis))
    assert_all_complete(results)
    assert_sim_text(results)
    print(f"Redis paused {outage_s} s; a new request completed {back[0]:.2f} s after its return")


def test_redis_crash_never_cuts_a_stream_silently(
    cluster: LocalCluster, redis: RestartableRedis
) -> None:
    back: list[float] = []

    async def crash_redis() -> None:
        redis.kill()
        await asyncio.sleep(2.0)
        redis.start()
        back.append(await first_success_after(cluster, "after-crash", 5.0))

    results = asyncio.run(streams_through(cluster, "crash", crash_redis))
    for r in results:
        # Complete and intact, or ended with an error that says so and names the request.
        if r.complete:
            continue
        assert r.contiguous, r.describe()
        assert r.error in ("UNAVAILABLE", "DATA_LOSS"), r.describe()
        assert r.request_id in r.error_detail, r.describe()
    assert_sim_text([r for r in results if r.complete])
    outcome = {"complete": sum(r.complete for r in results),
               "ended with an error": sum(not r.complete for r in results)}
    print(f"Redis crashed: {outcome}; a new request completed {back[0]:.2f} s after its return")


def test_gateway_keeps_serving_while_redis_is_down(
    cluster: LocalCluster, redis: RestartableRedis
) -> None:
    """New requests while Redis is down fail fast with UNAVAILABLE, not a hang or INTERNAL."""

    async def scenario() -> None:
        redis.kill()
        try:
            received = await follow(cluster.gateway_addr, sim_request("down-1", 8),
                                    reattach_for_s=0.0)
            assert received.error == "UNAVAILABLE", received.describe()
            assert "Redis" in received.error_detail
        finally:
            redis.start()
        await first_success_after(cluster, "after-down", 5.0)

    asyncio.run(scenario())


