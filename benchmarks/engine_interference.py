"""How much work on the other CPUs slows a pinned engine's steps, and which kind of work does.

The overhead benchmark (``vllm_overhead.py``) has found the system's engine stepping up to a
fifth more slowly beside the services than alone in some runs and as fast in others, though
the engine has a CPU to itself. This benchmark runs
the same engine alone (``vllm_overhead.py --engine-only``: the vllm backend in its own process
on ``--engine-cpus``, 1,024 requests of 128 tokens admitted at once) under four conditions,
every other process kept off the engine's CPU:

* **quiet**: nothing else runs;
* **services**: a local cluster with the ``sim`` engine (gateway, scheduler, worker, Redis) and
  a client stream the same workload, over and over: the services' own work, without a real
  engine in them;
* **spinner**: one Python process spinning (CPU, nothing in memory);
* **memory**: one process copying a 64 MiB array again and again (memory traffic that also
  evicts the caches the CPUs share).

Each repeat runs the four in turn, and each loaded run is compared with the quiet run of its
repeat: its mean step over the quiet one's (the slowdown). Medians over the repeats. Writes
benchmarks/results/engine_interference.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import vllm_overhead

from andes.up import ClusterConfig, LocalCluster, cpu_seconds, free_port

RESULTS = Path(__file__).resolve().parent / "results" / "engine_interference.json"

SPINNER = "while True: pass"
MEMORY_COPY = """
import numpy as np
source = np.ones(8 << 20)  # 64 MiB of float64: twice the shared L3 cache of the 2-core machine
target = np.empty_like(source)
while True:
    np.copyto(target, source)
"""
WARM_UP_S = 2.0
"""How long a load runs before the engine starts, so it is at full pace when measured."""


@contextmanager
def looping_process(code: str, engine_cpus: str) -> Iterator[None]:
    """``python -c code`` on the CPUs other than the engine's, for the block's duration."""
    with vllm_overhead.services_off(engine_cpus):
        process = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(WARM_UP_S)
        yield
    finally:
        process.kill()
        process.wait()


class ServicesLoad:
    """A sim-engine cluster on the other CPUs, streamed to by a client thread while on."""

    def __init__(self, cluster: LocalCluster, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.args = args
        self.runs: list[dict[str, Any]] = []

    @contextmanager
    def running(self) -> Iterator[None]:
        stop = threading.Event()

        def stream_until_stopped() -> None:
            with vllm_overhead.services_off(self.args.engine_cpus):
                while not stop.is_set():
                    pids = self.cluster.pids()
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    result = asyncio.run(vllm_overhead._drive(self.cluster.gateway_addr,
                                                              self.args))
                    result["cpu_seconds_by_process"] = {
                        name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
                    self.runs.append(result)

        thread = threading.Thread(target=stream_until_stopped, name="services-load")
        thread.start()
        try:
            time.sleep(WARM_UP_S)
            yield
        finally:
            stop.set()
            thread.join()


def engine_alone(args: argparse.Namespace) -> dict[str, Any]:
    run = vllm_overhead._in_child("--engine-only", args)
    return {key: run[key] for key in ("tok_per_s", "mean_step_s", "steps", "seconds")}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    config = ClusterConfig(
        backend="sim", workers=1, policy="fcfs", profile="cpu-tiny",
        gateway_port=free_port(), scheduler_port=free_port(),
        worker_args=("--max-batch", str(args.max_batch), "--kv-blocks", "4000"),
    )
    cluster = LocalCluster(config)
    with vllm_overhead.services_off(args.engine_cpus):
        cluster.start()
    try:
        services = ServicesLoad(cluster, args)
        loads: dict[str, Callable[[], Any]] = {
            "services": services.running,
            "spinner": lambda: looping_process(SPINNER, args.engine_cpus),
            "memory": lambda: looping_process(MEMORY_COPY, args.engine_cpus),
        }
        runs: dict[str, list[dict[str, Any]]] = {"quiet": [], **{name: [] for name in loads}}
        for repeat in range(args.repeats):
            runs["quiet"].append(engine_alone(args))
            for name, load in loads.items():
                with load():
                    runs[name].append(engine_alone(args))
            print(f"  repeat {repeat + 1}: " + ", ".join(
                f"{name} {rows[-1]['mean_step_s'] * 1e3:.2f} ms" for name, rows in runs.items()),
                flush=True)
    finally:
        cluster.stop()
    quiet_steps = [run["mean_step_s"] for run in runs["quiet"]]
    summary: dict[str, Any] = {}
    for name, rows in runs.items():
        slowdowns = [row["mean_step_s"] / quiet for row, quiet in zip(rows, quiet_steps,
                                                                     strict=True)]
        summary[name] = {
            "mean_step_s_median": statistics.median(row["mean_step_s"] for row in rows),
            "tok_per_s_median": statistics.median(row["tok_per_s"] for row in rows),
            "step_over_quiet_per_repeat": slowdowns,
            "step_over_quiet_median": statistics.median(slowdowns),
            "runs": rows,
        }
    summary["services"]["load_runs"] = services.runs
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a model directory (default: build the tiny shape)")
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-blocks", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine-cpus", default=vllm_overhead.default_engine_cpus(),
                        help="the engine's CPUs (default: the last one); loads keep off them")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.engine_cpus:
        parser.error("one CPU is not enough: the loads need CPUs the engine does not use")
    with tempfile.TemporaryDirectory() as scratch:
        if args.model is None:
            from andes.tiny_model import build_tiny_model

            args.model = str(build_tiny_model(Path(scratch) / "tiny", shape="tiny"))
        summary = measure(args)
    document = {
        "command": "python benchmarks/engine_interference.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "model")},
        "conditions": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    services_tok_s = [run["tok_per_s"] for run in summary["services"]["load_runs"]]
    print("engine alone, mean step over the quiet run's (median of the repeats): " + ", ".join(
        f"{name} {result['step_over_quiet_median']:.3f}"
        for name, result in summary.items() if name != "quiet")
        + f"; quiet step {summary['quiet']['mean_step_s_median'] * 1e3:.2f} ms; the services "
        f"streamed {statistics.median(services_tok_s):,.0f} tokens/s meanwhile (median)")


if __name__ == "__main__":
    main()
