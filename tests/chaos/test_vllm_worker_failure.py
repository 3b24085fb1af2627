"""A vllm worker is killed mid-generation: its requests resume on the other worker by
recompute (prompt + the tokens already published), and every client receives exactly the
greedy response an undisturbed engine produces, token for token and in text."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from andes.up import ClusterConfig, LocalCluster
from andes.v1 import generation_pb2
from loadgen.reattach import Received, follow
from tests.chaos.support import (
    assert_all_complete,
    metric_value,
    scale,
    wait_for,
)
from tests.conftest import VLLM_ENGINE_FLAGS, free_port
from tests.vllm_support import greedy

TOKENS = scale(96, 200)
PROMPTS = [f"Request {i}: tell me about {topic}" for i, topic in
           enumerate(["cats", "ships", "rain", "bread", "maps", "tea", "snow", "glass"]
                     [: scale(6, 8)])]


@pytest.fixture()
def cluster(tiny_model: str, redis_url: str, tmp_path: Path) -> Iterator[tuple[LocalCluster, int]]:
    metrics_port = free_port()
    config = ClusterConfig(
        backend="vllm", model=tiny_model, workers=2, policy="andes",
        gateway_port=free_port(), scheduler_port=free_port(), redis_url=redis_url,
        # Room for every request on either worker: this test is about the crash.
        worker_args=(*VLLM_ENGINE_FLAGS, "--kv-blocks", "64"),
        scheduler_args=("--metrics-port", str(metrics_port)),
    )
    with LocalCluster(config, log_dir=tmp_path) as running:
        yield running, metrics_port


def test_killed_vllm_worker_streams_continue_with_identical_greedy_text(
    cluster: tuple[LocalCluster, int], vllm_backend: object
) -> None:
    from transformers import AutoTokenizer

    running, metrics_port = cluster
    reference = greedy(vllm_backend, PROMPTS, TOKENS, ignore_eos=True)
    records = [Received(f"vkill-{i}", TOKENS) for i in range(len(PROMPTS))]

    async def scenario() -> None:
        tasks = [
            asyncio.create_task(follow(running.gateway_addr, generation_pb2.GenerateRequest(
                request_id=record.request_id, prompt=prompt, max_tokens=TOKENS,
                sampling=generation_pb2.SamplingParams(temperature=0.0, ignore_eos=True),
                qoe=generation_pb2.QoESpec(ttft_s=1.0, tds=20.0),
            ), into=record))
            for record, prompt in zip(records, PROMPTS, strict=True)
        ]
        # Mid-generation: every response has begun, none has ended.
        await wait_for(lambda: all(r.token_ids for r in records), 120.0, "every stream begins")
        running.kill("worker-0")
        await wait_for(lambda: metric_value(metrics_port, "andes_workers_live") == 1.0,
                       30.0, "the scheduler notices the dead worker")
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert_all_complete(records)
    assert running.log_dir is not None
    moved = (running.log_dir / "scheduler.log").read_text().count(" moved to worker ")
    assert moved > 0, "worker-0 held none of the requests"
    tokenizer = AutoTokenizer.from_pretrained(running.config.model)
    for record, expected in zip(records, reference, strict=True):
        assert record.token_ids == expected, record.describe()
        assert "".join(record.text) == tokenizer.decode(expected, skip_special_tokens=True)
