"""A burst's admission: the CPU each service spends per request when many arrive at once.

Starts a local cluster (Redis, scheduler, one sim worker with an H100-class profile and room
for the whole burst, gateway; each its own process, as ``andes up`` runs them) and sends
``--requests`` Generate calls at once over 8 gRPC connections, each asking for 2 tokens: the
work is almost all admission (the Generate call, the payload, the submission, the worker's
assignment, the stream's subscription and end), little is delivery. Per repeat: each
process's CPU time per request (from /proc), the wall time until the last response ended and
when the first tokens arrived (25th / 50th percentile and last, from the first call).
Reports the medians over ``--repeats`` fresh clusters. Writes
benchmarks/results/admission.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import uvloop

from andes.up import ClusterConfig, LocalCluster, cpu_seconds, free_port
from andes.v1 import generation_pb2, generation_pb2_grpc

RESULTS = Path(__file__).resolve().parent / "results" / "admission.json"
CHANNELS = 8


async def burst(target: str, requests: int, run_id: str) -> tuple[float, list[float]]:
    """Send every request at once; the wall time and each first token's time, in seconds."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
    stubs = [generation_pb2_grpc.GenerationServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
    started = time.perf_counter()

    async def one(i: int) -> float:
        request = generation_pb2.GenerateRequest(
            request_id=f"{run_id}-{i}", prompt_token_ids=list(range(5, 21)), max_tokens=2,
            qoe=generation_pb2.QoESpec(ttft_s=1000.0, tds=1000.0),
        )
        first = 0.0
        async for _ in stubs[i % CHANNELS].Generate(request, timeout=600):
            first = first or time.perf_counter() - started
        return first

    try:
        firsts = await asyncio.gather(*(one(i) for i in range(requests)))
        return time.perf_counter() - started, sorted(firsts)
    finally:
        for channel in channels:
            await channel.close()


def run_once(requests: int) -> dict[str, Any]:
    config = ClusterConfig(
        workers=1, policy="fcfs", profile="h100-llama3-8b",
        gateway_port=free_port(), scheduler_port=free_port(),
        worker_args=("--max-batch", str(max(requests, 256))),
        gateway_args=("--max-streams", str(max(4096, 2 * requests))),
    )
    with LocalCluster(config) as cluster:
        pids = cluster.pids()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        client_before = time.process_time()
        wall_s, firsts = uvloop.run(burst(cluster.gateway_addr, requests, f"adm{time.time_ns()}"))
        cpu_ms = {name: 1e3 * (cpu_seconds(pid) - before[name]) / requests
                  for name, pid in pids.items()}
        cpu_ms["client"] = 1e3 * (time.process_time() - client_before) / requests
    return {"wall_s": wall_s, "first_token_s_p25": firsts[len(firsts) // 4],
            "first_token_s_p50": firsts[len(firsts) // 2], "first_token_s_last": firsts[-1],
            "cpu_ms_per_request": cpu_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = []
    for repeat in range(args.repeats):
        runs.append(run_once(args.requests))
        cpu = {k: round(v, 2) for k, v in runs[-1]["cpu_ms_per_request"].items()}
        print(f"repeat {repeat + 1}: {runs[-1]['wall_s']:.2f} s, CPU ms per request {cpu}",
              flush=True)
    names = sorted({name for run in runs for name in run["cpu_ms_per_request"]})
    median = {
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "first_token_s_p50": statistics.median(r["first_token_s_p50"] for r in runs),
        "cpu_ms_per_request": {
            name: statistics.median(r["cpu_ms_per_request"].get(name, 0.0) for r in runs)
            for name in names
        },
    }
    median["cpu_ms_per_request_all"] = sum(median["cpu_ms_per_request"].values())
    document = {"command": "python benchmarks/admission.py " + " ".join(sys.argv[1:]),
                "settings": {"requests": args.requests, "repeats": args.repeats,
                             "cpu_cores": os.cpu_count()},
                "median": median, "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(median, indent=2))


if __name__ == "__main__":
    main()
