"""The whole system on a real engine: gateway -> scheduler -> vllm worker -> Redis -> client.

A local cluster (real processes, gRPC over sockets, Redis streams) with one vllm worker on
the tiny model. Greedy responses must be the very tokens an in-process engine produces for
the same prompts, also when the KV budget forces preemptions and resumes on the way.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from andes.up import ClusterConfig, LocalCluster
from andes.v1 import generation_pb2, generation_pb2_grpc
from tests.conftest import VLLM_ENGINE_FLAGS, free_port
from tests.vllm_support import PROMPTS, greedy
from worker.engine_process import autogroup_nice

SCHEDULER_METRICS = free_port()
WORKER_METRICS = free_port()


@pytest.fixture(scope="module")
def cluster(tiny_model: str, redis_url: str) -> Iterator[LocalCluster]:
    config = ClusterConfig(
        backend="vllm", model=tiny_model, workers=1, policy="andes",
        gateway_port=free_port(), scheduler_port=free_port(), redis_url=redis_url,
        worker_args=(*VLLM_ENGINE_FLAGS, "--metrics-port", str(WORKER_METRICS)),
        scheduler_args=("--max-preemptions", "2", "--metrics-port", str(SCHEDULER_METRICS)),
    )
    with LocalCluster(config) as running:
        yield running


def _counter(port: int, sample: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(sample))


async def _generate(target: str, prompts: list[str], max_tokens: int, *, run: str,
                    ignore_eos: bool = False) -> list[list[generation_pb2.GenerateResponse]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]

        async def one(index: int, prompt: str) -> list[generation_pb2.GenerateResponse]:
            request = generation_pb2.GenerateRequest(
                request_id=f"{run}-{index}", prompt=prompt, max_tokens=max_tokens,
                sampling=generation_pb2.SamplingParams(temperature=0.0, ignore_eos=ignore_eos),
                qoe=generation_pb2.QoESpec(ttft_s=1.0, tds=20.0),
            )
            return [message async for message in stub.Generate(request, timeout=120)]

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def _tokens(messages: list[generation_pb2.GenerateResponse]) -> list[int]:
    tokens: list[int] = []
    for message in messages:
        assert message.index == len(tokens), "indices must be contiguous"
        tokens.extend(message.token_ids)
    return tokens


def test_real_tokens_stream_through_the_cluster(cluster: LocalCluster,
                                                vllm_backend: object) -> None:
    from transformers import AutoTokenizer

    reference = greedy(vllm_backend, PROMPTS, 24)
    streams = asyncio.run(_generate(cluster.gateway_addr, PROMPTS, 24, run="plain"))
    tokenizer = AutoTokenizer.from_pretrained(cluster.config.model)
    for messages, expected in zip(streams, reference, strict=True):
        assert _tokens(messages) == expected
        assert "".join(m.text for m in messages) == tokenizer.decode(
            expected, skip_special_tokens=True)
        assert messages[-1].finish_reason in (
            generation_pb2.FINISH_REASON_LENGTH, generation_pb2.FINISH_REASON_STOP)
        assert messages[-1].usage.completion_tokens == len(expected)
    # The worker feeds its engine every step: it runs before the services beside it (where
    # raising priority is allowed), the engine before it.
    worker = cluster.pids()["worker-0"]
    engine = next(int(child) for child in
                  Path(f"/proc/{worker}/task/{worker}/children").read_text().split()
                  if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes())
    if os.getpriority(os.PRIO_PROCESS, os.getpid()) == 0 and os.geteuid() == 0:
        assert os.getpriority(os.PRIO_PROCESS, worker) == -5
        assert os.getpriority(os.PRIO_PROCESS, engine) == -10
        # With autogroups a niceness counts only within a session: the worker leads its
        # own (andes up starts every service so), the engine has one of its own.
        if autogroup_nice(worker) is not None:
            assert os.getsid(engine) == engine != os.getsid(worker) == worker
            assert (autogroup_nice(worker), autogroup_nice(engine)) == (-5, -10)


def test_burst_under_kv_pressure_loses_nothing(cluster: LocalCluster,
                                               vllm_backend: object) -> None:
    """8 requests of 200 tokens need 7 blocks each at the end; the worker has 12, so no two
    of them fit at their ends: whenever two run together, one is preempted and resumed (by
    the planner, or by the engine when KV runs out first: which of the two depends on
    timing). Every engine preemption reaches the scheduler, and every response is still the
    greedy one. (That plans' preemptions and resumes are executed as planned:
    tests/test_vllm_backend.py.)"""
    prompts = [f"Request number {i}: tell me a story about {w}"
               for i, w in enumerate(["cats", "ships", "rain", "bread"] * 2)]
    reference = greedy(vllm_backend, prompts, 200, ignore_eos=True)
    streams = asyncio.run(_generate(cluster.gateway_addr, prompts, 200, run="burst",
                                    ignore_eos=True))
    for messages, expected in zip(streams, reference, strict=True):
        assert _tokens(messages) == expected
        assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    # Every preemption the engine made by itself reached the scheduler.
    engine_forced = _counter(WORKER_METRICS, "andes_engine_preemptions_total")
    scheduler_forced = _counter(SCHEDULER_METRICS, 'andes_preemptions_total{cause="forced"}')
    planned = _counter(SCHEDULER_METRICS, 'andes_preemptions_total{cause="planned"}')
    print(f"preemptions: planned {planned:g}, engine {engine_forced:g}")
    assert engine_forced == scheduler_forced
    assert planned + engine_forced > 0, "this much KV pressure must preempt"


def test_a_request_the_engine_refuses_fails_alone(cluster: LocalCluster,
                                                  vllm_backend: object) -> None:
    """A prompt longer than the model takes (256 tokens) passes the gateway and the
    scheduler (it fits the KV budget) but not the engine: its call
    ends with INTERNAL, and the requests that came with it are served."""
    reference = greedy(vllm_backend, PROMPTS[:2], 8)

    async def together() -> list[object]:
        return list(await asyncio.gather(
            _generate(cluster.gateway_addr, ["word " * 150], 8, run="refused"),
            _generate(cluster.gateway_addr, PROMPTS[:2], 8, run="beside"),
            return_exceptions=True))

    refused, served = asyncio.run(together())
    assert isinstance(refused, grpc.aio.AioRpcError), refused
    assert refused.code() == grpc.StatusCode.INTERNAL
    assert isinstance(served, list) and [_tokens(m) for m in served] == reference
