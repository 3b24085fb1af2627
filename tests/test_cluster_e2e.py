"""The whole system in real processes: Redis, scheduler, two sim workers, gateway, clients."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from andes.up import ClusterConfig, LocalCluster
from andes.workload import make_workload
from loadgen.driver import drive
from tests.conftest import free_port


@pytest.fixture(scope="module")
def cluster(redis_url: str) -> Iterator[LocalCluster]:
    config = ClusterConfig(
        backend="sim",
        workers=2,
        policy="andes",
        profile="a100-opt13b",
        gateway_port=free_port(),
        scheduler_port=free_port(),
        redis_url=redis_url,
    )
    with LocalCluster(config) as running:
        yield running


def test_200_concurrent_streams_complete_contiguously(cluster: LocalCluster) -> None:
    # 200 requests sent at once, 20-60 tokens each: every stream is open at the same time.
    base = make_workload("alpaca", "reading", "poisson", 1.0, num_requests=200, seed=3)
    workload = type(base)(
        arrival_s=np.zeros(200),
        prompt_tokens=base.prompt_tokens,
        output_tokens=np.clip(base.output_tokens, 20, 60),
        ttft_s=base.ttft_s,
        tds=base.tds,
    )
    result = asyncio.run(drive(cluster.gateway_addr, workload, run_id="e2e200"))
    assert result.errors == {}
    assert len(result.records) == 200
    for record, expected in zip(result.records, workload.output_tokens, strict=True):
        assert record.indices_ok, record.request_id
        assert len(record.token_times) == int(expected), record.request_id
        assert record.finish_reason != 0
        assert 0.0 <= record.qoe <= 1.0
    qoes = np.array([r.qoe for r in result.records])
    assert qoes.mean() > 0.5  # a light load: the users are served
