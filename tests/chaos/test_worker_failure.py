"""A worker dies (SIGKILL) or hangs (SIGSTOP) mid-generation: its requests move to another
worker and resume there by recompute; every client's stream goes on with no token duplicated
or missing."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from andes.up import ClusterConfig, LocalCluster
from loadgen.reattach import Received, follow
from tests.chaos.support import (
    assert_all_complete,
    assert_sim_text,
    metric_value,
    restartable_redis,
    scale,
    sim_request,
    wait_for,
)
from tests.conftest import free_port

STREAMS = scale(24, 120)
TOKENS = scale(160, 400)


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, int]]:
    metrics_port = free_port()
    with restartable_redis(str(tmp_path)) as redis:
        config = ClusterConfig(
            backend="sim", workers=2, policy="andes", profile="a100-opt13b",
            gateway_port=free_port(), scheduler_port=free_port(), redis_url=redis.url,
            scheduler_args=("--metrics-port", str(metrics_port)),
        )
        with LocalCluster(config, log_dir=tmp_path) as running:
            yield running, metrics_port


def moves_logged(cluster: LocalCluster) -> int:
    """Requests the scheduler moved to another worker, from its log."""
    assert cluster.log_dir is not None
    return (cluster.log_dir / "scheduler.log").read_text().count(" moved to worker ")


async def _run_with(
    cluster: LocalCluster, prefix: str, fault: object
) -> tuple[list[Received], object]:
    """Start the streams, let every one get tokens, apply ``fault``, collect the streams."""
    tasks = [
        asyncio.create_task(follow(cluster.gateway_addr, sim_request(f"{prefix}-{i}", TOKENS)))
        for i in range(STREAMS)
    ]
    await asyncio.sleep(1.5)  # every stream is admitted and under way
    assert callable(fault)
    outcome = await fault()
    results = await asyncio.gather(*tasks)
    return list(results), outcome


def test_killed_worker_is_noticed_and_its_streams_continue_elsewhere(
    cluster: tuple[LocalCluster, int],
) -> None:
    running, metrics_port = cluster

    async def kill_worker() -> float:
        killed_at = time.monotonic()
        running.kill("worker-0")
        await wait_for(lambda: metric_value(metrics_port, "andes_workers_live") == 1.0,
                       30.0, "the scheduler notices the dead worker")
        return time.monotonic() - killed_at

    results, noticed_s = asyncio.run(_run_with(running, "kill", kill_worker))
    assert_all_complete(results)
    assert_sim_text(results)
    assert moves_logged(running) > 0
    print(f"worker death noticed after {noticed_s:.3f} s")
    # Nothing was resumed by the client: the gateway never went away.
    assert all(r.attachments == 1 for r in results)


def test_hung_worker_is_declared_dead_and_its_return_changes_nothing(
    cluster: tuple[LocalCluster, int],
) -> None:
    """SIGSTOP: the session stays open but the worker is silent. After the worker timeout
    the scheduler moves its requests; when the worker wakes up it is told they moved and
    writes nothing more to their streams."""
    running, metrics_port = cluster

    async def hang_worker() -> float:
        stopped_at = time.monotonic()
        running.kill("worker-0", signal.SIGSTOP)
        await wait_for(lambda: metric_value(metrics_port, "andes_workers_live") == 1.0,
                       30.0, "the scheduler declares the silent worker dead")
        noticed = time.monotonic() - stopped_at
        await asyncio.sleep(2.0)  # its requests move and resume elsewhere
        running.kill("worker-0", signal.SIGCONT)
        await wait_for(lambda: metric_value(metrics_port, "andes_workers_live") == 2.0,
                       30.0, "the woken worker registers again")
        return noticed

    results, noticed_s = asyncio.run(_run_with(running, "hang", hang_worker))
    assert_all_complete(results)
    assert_sim_text(results)
    assert moves_logged(running) > 0
    print(f"silent worker declared dead after {noticed_s:.3f} s")
