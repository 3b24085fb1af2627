"""What the chaos tests share: a Redis they may kill, clients that record every token and
resume like a production client, and the checks that nothing was lost or duplicated.

``ANDES_CHAOS_LONG=1`` (``make chaos``) runs each scenario at a larger scale;
CI runs the short version.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from andes.up import free_port, redis_answers
from andes.v1 import generation_pb2
from loadgen.reattach import Received
from worker.sim_backend import token_id, token_text

LONG = os.environ.get("ANDES_CHAOS_LONG", "") not in ("", "0")
"""The long version: more streams, more tokens, longer outages."""


def scale(short: int, long: int) -> int:
    return long if LONG else short


class RestartableRedis:
    """A private ``redis-server`` on a fixed port: kill it, restart it, pause it."""

    def __init__(self, workdir: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not redis_answers(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        """A crash: every stream it held is gone (no persistence)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def pause(self) -> None:
        """Unreachable: connections stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(timeout=10)


@contextmanager
def restartable_redis(workdir: str) -> Iterator[RestartableRedis]:
    redis = RestartableRedis(workdir)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


def sim_request(request_id: str, max_tokens: int, *, tds: float = 20.0
                ) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id=request_id, prompt=f"chaos prompt {request_id}", max_tokens=max_tokens,
        sampling=generation_pb2.SamplingParams(ignore_eos=True),
        qoe=generation_pb2.QoESpec(ttft_s=1.0, tds=tds),
    )


def sim_text(request_id: str, tokens: int) -> str:
    """What a sim worker generates for ``request_id``: the same on every worker."""
    return "".join(token_text(token_id(request_id, i)) for i in range(tokens))


def assert_all_complete(results: list[Received]) -> None:
    broken = [r.describe() for r in results if not r.complete]
    assert not broken, f"{len(broken)} of {len(results)} responses broken:\n" + "\n".join(
        broken[:10])


def assert_sim_text(results: list[Received]) -> None:
    for r in results:
        assert "".join(r.text) == sim_text(r.request_id, r.max_tokens), r.describe()


def metric_value(port: int, name: str, labels: str = "") -> float:
    """A sample of a Prometheus metric served on 127.0.0.1:``port`` (0.0 if absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in body.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


async def wait_for(predicate: object, timeout_s: float, what: str) -> float:
    """Poll ``predicate()`` until true; seconds it took (fails after ``timeout_s``)."""
    assert callable(predicate)
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start
