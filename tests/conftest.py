"""Shared fixtures: real Redis servers and free ports for the service tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from andes.up import free_port

__all__ = ["free_port", "redis_url", "tiny_model", "vllm_backend"]

VLLM_KV_BLOCKS = 12
VLLM_BLOCK_SIZE = 32
"""The test engine's KV budget: 384 tokens, so a few requests exhaust it (32: the smallest
block the CPU attention backend takes)."""
VLLM_ENGINE_FLAGS = (
    "--dtype", "float32", "--max-batch", "8", "--max-batched-tokens", "256",
    "--max-model-len", "256", "--kv-blocks", str(VLLM_KV_BLOCKS),
    "--block-size", str(VLLM_BLOCK_SIZE),
)
"""The same engine settings as worker flags, for clusters in tests."""


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: ``ANDES_REDIS_URL`` if set, else a private ``redis-server`` for the run."""
    configured = os.environ.get("ANDES_REDIS_URL")
    if configured:
        yield configured
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny random Llama of ``andes model tiny``, built once per run (seed 0)."""
    from andes.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def vllm_backend(tiny_model: str) -> Iterator[object]:
    """One in-process vllm backend on the tiny model for the run, settings as
    ``VLLM_ENGINE_FLAGS`` (greedy outputs of a cluster's worker match it token for token)."""
    from worker.vllm_backend import VllmBackend, VllmConfig

    yield VllmBackend(VllmConfig(
        model=tiny_model, dtype="float32", max_num_seqs=8, max_num_batched_tokens=256,
        max_model_len=256, num_gpu_blocks=VLLM_KV_BLOCKS, block_size=VLLM_BLOCK_SIZE,
        measure_profile=False,
    ))
