"""What the distributed system costs on top of a plain vLLM engine, at a saturating load.

Same tiny model, same engine settings and KV budget, same requests (fixed prompts, greedy,
fixed output lengths), all sent at once so the engine is never idle:

* **plain**: one in-process ``LLMEngine`` with vLLM's own scheduler, stepped in a loop (in a
  child process, so its memory is gone before the cluster starts);
* **system**: gateway -> scheduler -> one vllm worker -> Redis -> gRPC clients, with the
  ``fcfs`` policy (the same admission order as vLLM's).

Both run the engine on the same CPU (``--engine-cpus``, the last one by default), as a CPU
deployment would: the system's services (and this client) keep to the other CPUs, as a
plain engine has its CPU to itself.

Output tokens/s of each and their ratio (goal >= 0.9): plain and system runs alternate,
starting and ending with a plain one, and each system run is compared with the plain runs
just before and after it (their mean time); the figure is the median of these ratios, with the
ratio of the two kinds' medians beside it. Where the difference goes: each ratio is the
product of three factors (:func:`ratio_factors`):
how much fuller the plain loop's batches were (its steps over the system's, for the same
tokens), how much faster its steps were, and the share of the system's time its engine was
stepping (the worker's step durations from its Prometheus metrics against the run's wall
time).

Between the two, each repeat also runs **the engine alone**: the system's engine as its worker
starts it (the vllm backend in a process of its own, same flags and CPUs), driven by a bare
loop with no service running. Its ratio to the plain runs around it is what the backend and
the process split cost (or save); the system's ratio to it is what the services around the
engine cost, split into the same three factors.

Two models by default (``andes model tiny --shape``): ``tiny``, whose steps are a few
milliseconds of framework overhead (every service's per-token CPU competes with it on a small
machine), and ``small``, whose steps cost compute, as a real model's do on its accelerator.
Writes benchmarks/results/vllm_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from andes.up import ClusterConfig, LocalCluster, cpu_seconds, free_port
from andes.v1 import generation_pb2, generation_pb2_grpc
from loadgen.driver import CHANNEL_OPTIONS
from worker.engine_process import parse_cpus

RESULTS = Path(__file__).resolve().parent / "results" / "vllm_overhead.json"

REQUESTS = {"tiny": 1024, "small": 256}
"""Requests per run by shape, so that each shape's plain loop runs about 20-25 s on the 2-core
machine: a saturating load, not a start. Until the services have handed the engine a full
batch (0.3-0.4 s; arrivals come through the one CPU the engine leaves them) and while the last
requests drain as staggered as they came, the system's batches are not full. With 256
requests of the tiny shape (6 s) that ramp was 5-8% of the run, with 1,024 about 2%; the small
shape's steps are 5x longer, so 256 of them run as long."""


def prompts(count: int) -> list[list[int]]:
    """Distinct 16-token prompts of ordinary token ids (no prefix-cache sharing)."""
    return [[5 + (i * 131 + j * 17) % 1800 for j in range(16)] for i in range(count)]


def engine_flags(args: argparse.Namespace) -> list[str]:
    return ["--dtype", "float32", "--max-batch", str(args.max_batch),
            "--max-batched-tokens", str(args.max_batched_tokens),
            "--max-model-len", "512", "--kv-blocks", str(args.kv_blocks)]


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    """Child process: vLLM alone, the loop every vLLM user writes."""
    from worker.engine_process import ENGINE_NICE, parse_cpus, pin_to_cpus, set_nice
    from worker.vllm_backend import VllmConfig, prepare_environment

    # The same priority as the system's engine process (niceness and scheduling group), so
    # that the two differ only by the services around the engine.
    set_nice(ENGINE_NICE, "plain engine", own_session=True)
    if args.engine_cpus:
        pin_to_cpus(parse_cpus(args.engine_cpus), "plain engine")
    prepare_environment(VllmConfig(model=args.model))
    from vllm import EngineArgs, LLMEngine, SamplingParams

    engine = LLMEngine.from_engine_args(EngineArgs(
        model=args.model, dtype="float32", enforce_eager=True, max_model_len=512,
        max_num_seqs=args.max_batch, max_num_batched_tokens=args.max_batched_tokens,
        num_gpu_blocks_override=args.kv_blocks + 1, async_scheduling=False, seed=0,
        disable_log_stats=True,  # as vLLM's offline `LLM` and the system's worker
    ))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    for i, ids in enumerate(prompts(args.requests)):
        engine.add_request(f"plain-{i}", engine.renderer.render_cmpl(
            [{"prompt_token_ids": ids}])[0], params)
    tokens = steps = 0
    first_token = 0.0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if not first_token and output.outputs[0].token_ids:
                first_token = time.perf_counter() - started
            if output.finished:
                tokens += len(output.outputs[0].token_ids)
        steps += 1
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed,
            "steps": steps, "mean_step_s": elapsed / steps, "first_token_s": first_token}


def run_engine_alone(args: argparse.Namespace) -> dict[str, Any]:
    """Child process: the system's engine as a worker starts it (the vllm backend in a
    process of its own on ``--engine-cpus``, the same flags), driven by a bare loop in place
    of the worker: every request added and admitted at once, then stepped until done, with
    no service running. Against the plain loop it shows what the backend and the process
    split cost; against the system, what the services around the engine cost."""
    from andes.heap import settle_heap
    from worker.cli import parse_args, worker_config
    from worker.engine import PlanSpec, RequestSpec
    from worker.service import start_engine

    config = worker_config(parse_args(["--backend", "vllm", "--model", args.model,
                                       *engine_flags(args), "--engine-cpus", args.engine_cpus]))
    engine, _ = start_engine(config)
    settle_heap()
    sampling = json.dumps({"temperature": 0.0, "ignore_eos": True}).encode()
    specs = [RequestSpec(f"alone-{i}", len(ids), args.max_tokens, time.time(), 1000.0, 1000.0,
                         payload_key="", token_stream_key="",
                         payload={b"prompt_token_ids": json.dumps(ids).encode(),
                                  b"sampling": sampling})
             for i, ids in enumerate(prompts(args.requests))]
    try:
        started = time.perf_counter()
        engine.add(specs)
        engine.apply(PlanSpec(version=1, admit=tuple(spec.request_id for spec in specs)))
        tokens = steps = 0
        engine_s = first_token = 0.0
        while engine.has_work():
            outcome = engine.step(time.time())
            if outcome.idle:
                continue
            steps += 1
            engine_s += outcome.duration_s
            tokens += sum(len(run.token_ids) for run in outcome.tokens)
            if not first_token and outcome.tokens:
                first_token = time.perf_counter() - started
        elapsed = time.perf_counter() - started
    finally:
        getattr(engine, "close", lambda: None)()
    return {"tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed,
            "steps": steps, "mean_step_s": engine_s / steps, "engine_seconds": engine_s,
            "outside_engine_fraction": 1 - engine_s / elapsed, "first_token_s": first_token}


async def _drive(target: str, args: argparse.Namespace) -> dict[str, Any]:
    # Eight connections of their own, as eight clients' (grpc-core otherwise shares one).
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(8)]
    stubs = [generation_pb2_grpc.GenerationServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
    last_token = [0.0]
    first_token = [0.0]

    async def one(i: int, ids: list[int]) -> int:
        request = generation_pb2.GenerateRequest(
            request_id=f"overhead-{time.time_ns()}-{i}", prompt_token_ids=ids,
            max_tokens=args.max_tokens,
            sampling=generation_pb2.SamplingParams(temperature=0.0, ignore_eos=True),
            qoe=generation_pb2.QoESpec(ttft_s=1000.0, tds=1000.0),
        )
        count = 0
        async for message in stubs[i % len(stubs)].Generate(request, timeout=600):
            count += len(message.token_ids)
            last_token[0] = time.perf_counter()
            if not first_token[0]:
                first_token[0] = last_token[0]
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts(args.requests))))
    elapsed = last_token[0] - started
    for channel in channels:
        await channel.close()
    tokens = sum(counts)
    return {"tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed,
            "first_token_s": first_token[0] - started}


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("andes_step_seconds_sum", "andes_step_seconds_count",
                            "andes_tokens_generated_total")):
            name, value = line.split()
            values[name] = float(value)
    return values


def _redis_pid() -> int:
    found = subprocess.run(["pgrep", "-o", "redis-server"], capture_output=True, text=True)
    return int(found.stdout.split()[0]) if found.stdout.strip() else 0


def run_system(args: argparse.Namespace) -> dict[str, Any]:
    metrics_port = free_port()
    config = ClusterConfig(
        backend="vllm", model=args.model, workers=1, policy="fcfs",
        gateway_port=free_port(), scheduler_port=free_port(),
        worker_args=(*engine_flags(args), "--metrics-port", str(metrics_port),
                     "--engine-cpus", args.engine_cpus),
    )
    with services_off(args.engine_cpus), LocalCluster(config) as cluster:
        pids = {name: pid for name, pid in cluster.pids().items() if name != "redis"}
        pids["redis"] = cluster.pids().get("redis", _redis_pid())
        pids["client (this benchmark)"] = os.getpid()
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        before = _scrape(metrics_port)
        result = asyncio.run(_drive(cluster.gateway_addr, args))
        after = _scrape(metrics_port)
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    result["cpu_seconds_by_process"] = cpu
    engine_s = after["andes_step_seconds_sum"] - before.get("andes_step_seconds_sum", 0.0)
    steps = after["andes_step_seconds_count"] - before.get("andes_step_seconds_count", 0.0)
    result.update({"steps": int(steps), "engine_seconds": engine_s,
                   "mean_step_s": engine_s / max(steps, 1),
                   "outside_engine_fraction": 1 - engine_s / result["seconds"]})
    return result


@contextlib.contextmanager
def services_off(engine_cpus: str) -> Iterator[None]:
    """While the block runs, this process (the client) and what it starts (the services,
    a private Redis) keep off ``engine_cpus``; the worker puts its engine there."""
    mine = os.sched_getaffinity(0)
    rest = mine - parse_cpus(engine_cpus)
    if rest and rest != mine:
        os.sched_setaffinity(0, rest)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Plain, engine-alone and system runs on ``args.model``, alternating (plain, engine
    alone, system, plain, ..., plain): each system (and engine-alone) run against the mean of
    the plain runs around it, so a drift of the machine's speed during the session (it moves
    by tens of percent here, within minutes) hits both sides of a comparison alike where it
    is steady over the runs between; each comparison's ratio, their median, and the medians
    of each kind; and each system run against the engine-alone run just before it."""
    plain_runs = [_in_child("--plain-only", args)]
    alone_runs = []
    system_runs = []
    for _ in range(args.repeats):
        alone_runs.append(_in_child("--engine-only", args))
        system_runs.append(run_system(args))
        plain_runs.append(_in_child("--plain-only", args))
        print(f"  plain {plain_runs[-2]['tok_per_s']:.0f}, engine alone "
              f"{alone_runs[-1]['tok_per_s']:.0f}, system {system_runs[-1]['tok_per_s']:.0f}, "
              f"plain {plain_runs[-1]['tok_per_s']:.0f} tok/s", flush=True)
    brackets = [bracket(before, after) for before, after in itertools.pairwise(plain_runs)]
    pair_ratios = _ratios(brackets, system_runs)
    alone_ratios = _ratios(brackets, alone_runs)
    services_ratios = _ratios(alone_runs, system_runs)
    factors = [ratio_factors(p, s) for p, s in zip(brackets, system_runs, strict=True)]
    services_factors = [ratio_factors(a, s) for a, s in zip(alone_runs, system_runs,
                                                            strict=True)]
    plain = statistics.median(r["tok_per_s"] for r in plain_runs)
    system = statistics.median(r["tok_per_s"] for r in system_runs)
    return {
        "plain_tok_per_s_median": plain,
        "system_tok_per_s_median": system,
        "pairing": "each system run against the mean time of the plain runs before and "
                   "after it",
        "ratio_median_of_pairs": statistics.median(pair_ratios),
        "ratio_system_over_plain": system / plain,
        "ratio_per_repeat": pair_ratios,
        "plain_mean_step_s_median": statistics.median(r["mean_step_s"] for r in plain_runs),
        "system_mean_step_s_median": statistics.median(r["mean_step_s"] for r in system_runs),
        "outside_engine_fraction_median": statistics.median(
            r["outside_engine_fraction"] for r in system_runs),
        "ratio_factors_per_repeat": factors,
        "ratio_factors_median": _median_factors(factors),
        "engine_alone_over_plain_per_repeat": alone_ratios,
        "engine_alone_over_plain_median": statistics.median(alone_ratios),
        "system_over_engine_alone_per_repeat": services_ratios,
        "system_over_engine_alone_median": statistics.median(services_ratios),
        "system_over_engine_alone_factors_median": _median_factors(services_factors),
        "plain_runs": plain_runs,
        "engine_alone_runs": alone_runs,
        "system_runs": system_runs,
    }


def _ratios(references: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[float]:
    """Each run's tokens/s over its reference's, repeat by repeat."""
    return [run["tok_per_s"] / reference["tok_per_s"]
            for reference, run in zip(references, runs, strict=True)]


def _median_factors(factors: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(f[name] for f in factors) for name in factors[0]}


def bracket(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Two plain runs as one: their mean time and mean steps (the same tokens), so that
    tokens/s and the mean step keep their meaning and :func:`ratio_factors` stays exact."""
    seconds = (before["seconds"] + after["seconds"]) / 2
    steps = (before["steps"] + after["steps"]) / 2
    return {"tokens": before["tokens"], "seconds": seconds, "steps": steps,
            "tok_per_s": before["tokens"] / seconds, "mean_step_s": seconds / steps}


def ratio_factors(reference: dict[str, Any], system: dict[str, Any]) -> dict[str, float]:
    """A pair's ratio as the product of where it goes, exactly: each run's time is its
    engine's (steps x mean step) divided by its busy share. The reference is the plain loop
    (busy stepping all its time: its mean step is its time over its steps) or the engine
    alone (busy as its loop leaves it):

    * ``batch_fill``: reference steps / system steps, the same tokens in more steps when the
      batch fills later (arrivals through the services) and drains as staggered;
    * ``step_speed``: reference mean step / system mean step, steps slowed by what runs
      beside them;
    * ``engine_busy``: the share of the system's time its engine was stepping, over the
      reference's."""
    reference_busy = 1 - reference.get("outside_engine_fraction", 0.0)
    return {
        "batch_fill": reference["steps"] / system["steps"],
        "step_speed": reference["mean_step_s"] / system["mean_step_s"],
        "engine_busy": (1 - system["outside_engine_fraction"]) / reference_busy,
    }


def _in_child(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """A plain (``--plain-only``) or engine-alone (``--engine-only``) run in a process of its
    own, so its memory is gone before the next run starts."""
    child = subprocess.run(
        [sys.executable, __file__, kind, "--model", args.model,
         "--engine-cpus", args.engine_cpus,
         "--requests", str(args.requests), "--max-tokens", str(args.max_tokens),
         "--max-batch", str(args.max_batch), "--kv-blocks", str(args.kv_blocks),
         "--max-batched-tokens", str(args.max_batched_tokens)],
        check=True, capture_output=True, text=True,
    )
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def default_engine_cpus() -> str:
    """The engine on a CPU of its own, as a CPU deployment runs it (``--engine-cpus``):
    the last one, where the services have another."""
    cpus = sorted(os.sched_getaffinity(0))
    return str(cpus[-1]) if len(cpus) > 1 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a model directory (default: build the --shapes)")
    parser.add_argument("--shapes", default="tiny,small",
                        help="without --model: the `andes model tiny --shape` models to build "
                             "and measure (default tiny,small)")
    parser.add_argument("--requests", type=int,
                        help="requests per run (default: 1,024 on the tiny shape, 256 on the "
                             "small one or a --model; see REQUESTS)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-blocks", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3,
                        help="system runs per model, each between two plain runs (default 3)")
    parser.add_argument("--engine-cpus", default=default_engine_cpus(),
                        help="CPUs of the engine, plain and in the system, where the services "
                             "keep off (taskset -c list; empty: no pinning; default: the "
                             "last CPU where there are two or more)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_only:
        print(json.dumps(run_plain(args)))
        return
    if args.engine_only:
        print(json.dumps(run_engine_alone(args)))
        return
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        if args.model is not None:
            models = {Path(args.model).name: args.model}
        else:
            from andes.tiny_model import build_tiny_model

            models = {shape: str(build_tiny_model(Path(scratch) / shape, shape=shape))
                      for shape in args.shapes.split(",")}
        requests = args.requests
        for name, model in models.items():
            args.requests = requests or REQUESTS.get(name, 256)
            print(f"{name}: {args.requests} requests", flush=True)
            args.model = model
            results[name] = measure(args)
            results[name]["requests"] = args.requests
    document = {
        "command": "python benchmarks/vllm_overhead.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items()
                     if k not in ("json", "plain_only", "engine_only", "model", "requests")},
        "models": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    for name, result in results.items():
        runs = result["system_runs"]
        cpu = runs[len(runs) // 2]["cpu_seconds_by_process"]
        print(f"{name}: system / plain = {result['ratio_median_of_pairs']:.3f} (median of the "
              f"pairs' ratios; goal >= 0.9), {result['ratio_system_over_plain']:.3f} (median "
              f"over median); "
              f"steps {result['plain_mean_step_s_median'] * 1e3:.1f} ms alone, "
              f"{result['system_mean_step_s_median'] * 1e3:.1f} ms in the system; "
              f"worker time outside engine.step(): "
              f"{result['outside_engine_fraction_median']:.1%}; ratio = "
              + " x ".join(f"{name} {value:.3f}"
                           for name, value in result["ratio_factors_median"].items())
              + f" (medians); the engine alone (its process, no services) / plain = "
              f"{result['engine_alone_over_plain_median']:.3f}, system / engine alone = "
              f"{result['system_over_engine_alone_median']:.3f} ("
              + " x ".join(f"{name} {value:.3f}" for name, value
                           in result["system_over_engine_alone_factors_median"].items())
              + "); CPU seconds in one run: "
              + ", ".join(f"{n} {sec:.1f}" for n, sec in sorted(cpu.items(), key=lambda x: -x[1])))


if __name__ == "__main__":
    main()
