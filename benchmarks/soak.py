"""Soak: a long run at a fixed fraction of capacity while a worker is killed periodically.

A local cluster (real processes, sim workers, a private or configured Redis) first has its
capacity measured: a burst of requests, all sent at once, and the rate at which they complete
(requests/s). Then Poisson arrivals at ``--load`` x capacity for ``--duration-s`` seconds;
every ``--kill-every-s`` seconds one worker (in turn) is SIGKILLed and started again. Clients
reattach after a lost stream like production clients (:mod:`loadgen.reattach`).

Reported: requests sent, completed, lost (sent - completed intact), streams with indices not
contiguous, tokens differing from what the sim generates, requests moved by the scheduler,
and the gateway's resident memory (RSS) over the run: its growth from the end of the warm-up
to the end (goal < 5%). Writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from andes.up import ClusterConfig, LocalCluster, free_port
from andes.v1 import generation_pb2
from loadgen.reattach import Received, follow
from worker.sim_backend import token_id

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"


def request(request_id: str, rng: random.Random) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id=request_id, prompt="soak " * rng.randint(32, 256),
        max_tokens=rng.randint(64, 256),
        sampling=generation_pb2.SamplingParams(ignore_eos=True),
        qoe=generation_pb2.QoESpec(ttft_s=1.0, tds=10.0),
    )


def intact(received: Received) -> bool:
    """Complete, contiguous, and every token is the one the sim generates at its index."""
    return received.complete and all(
        t == token_id(received.request_id, i) for i, t in enumerate(received.token_ids)
    )


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def measure_capacity(cluster: LocalCluster, burst: int, rng: random.Random) -> float:
    """Requests/s the cluster completes when it has more work than it can take at once."""
    start = time.monotonic()
    async with grpc.aio.insecure_channel(cluster.gateway_addr) as channel:
        results = await asyncio.gather(*(
            follow(cluster.gateway_addr, request(f"cap-{i}", rng), channel=channel)
            for i in range(burst)
        ))
    elapsed = time.monotonic() - start
    done = sum(intact(r) for r in results)
    if done < burst:
        raise RuntimeError(f"capacity burst: only {done} of {burst} requests completed")
    return burst / elapsed


async def soak(cluster: LocalCluster, args: argparse.Namespace, rate: float,
               rng: random.Random) -> dict[str, Any]:
    tasks: list[asyncio.Task[Received]] = []
    gateway_pid = cluster.pids()["gateway"]
    rss: list[tuple[float, int]] = []
    kills: list[dict[str, Any]] = []
    start = time.monotonic()

    async def arrivals() -> None:
        next_at = start
        index = 0
        while (now := time.monotonic()) - start < args.duration_s:
            if now < next_at:
                await asyncio.sleep(next_at - now)
            tasks.append(asyncio.create_task(follow(
                cluster.gateway_addr, request(f"soak-{index}", rng), reattach_for_s=60,
                channel=channels[index % len(channels)],
            )))
            index += 1
            next_at += rng.expovariate(rate)

    async def sample_rss() -> None:
        while time.monotonic() - start < args.duration_s:
            rss.append((time.monotonic() - start, rss_bytes(gateway_pid)))
            await asyncio.sleep(args.rss_every_s)

    async def kill_workers() -> None:
        count = 0
        while True:
            await asyncio.sleep(args.kill_every_s)
            if time.monotonic() - start >= args.duration_s:
                return
            name = f"worker-{count % args.workers}"
            at = time.monotonic() - start
            cluster.kill(name)
            await asyncio.to_thread(cluster.restart, name)
            kills.append({"worker": name, "at_s": round(at, 1),
                          "back_after_s": round(time.monotonic() - start - at, 2)})
            print(f"[{at:6.1f} s] killed and restarted {name}", flush=True)
            count += 1

    channels = [grpc.aio.insecure_channel(cluster.gateway_addr) for _ in range(4)]
    try:
        await asyncio.gather(arrivals(), sample_rss(), kill_workers())
        results = await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    warm = [b for t, b in rss if t >= args.warmup_s]
    warm_start = statistics.median(warm[:3])
    end = statistics.median(warm[-3:])
    assert cluster.log_dir is not None
    moved = (cluster.log_dir / "scheduler.log").read_text().count(" moved to worker ")
    sent = len(results)
    completed = sum(intact(r) for r in results)
    return {
        "rate_rps": round(rate, 3),
        "sent": sent,
        "completed_intact": completed,
        "lost": sent - completed,
        "not_contiguous": sum(not r.contiguous for r in results),
        "failed": {code: sum(r.error == code for r in results)
                   for code in sorted({r.error for r in results if r.error})},
        "reattached_streams": sum(r.attachments > 1 for r in results),
        "requests_moved_by_scheduler": moved,
        "tokens_delivered": sum(len(r.token_ids) for r in results),
        "worker_kills": kills,
        "gateway_rss_mib": {
            "after_warmup": round(warm_start / 2**20, 1),
            "end": round(end / 2**20, 1),
            "max_after_warmup": round(max(warm) / 2**20, 1),
            "growth_after_warmup": round(end / warm_start - 1, 4),
        },
        "rss_samples": [(round(t, 1), round(b / 2**20, 2)) for t, b in rss],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--kill-every-s", type=float, default=60.0)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of capacity")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--profile", default="a100-opt13b")
    parser.add_argument("--burst", type=int, default=300,
                        help="requests sent at once to measure capacity")
    parser.add_argument("--warmup-s", type=float, default=120.0)
    parser.add_argument("--rss-every-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="andes-soak-") as logs:
        config = ClusterConfig(
            backend="sim", workers=args.workers, policy="andes", profile=args.profile,
            gateway_port=free_port(), scheduler_port=free_port(),
        )
        with LocalCluster(config, log_dir=Path(logs)) as cluster:
            capacity = asyncio.run(measure_capacity(cluster, args.burst, rng))
            print(f"capacity: {capacity:.2f} requests/s; soaking at {args.load:.0%} of it "
                  f"for {args.duration_s:.0f} s, a worker killed every {args.kill_every_s:.0f} s",
                  flush=True)
            report = asyncio.run(soak(cluster, args, capacity * args.load, rng))
    report = {
        "command": "python benchmarks/soak.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "capacity_rps": round(capacity, 3), "load": args.load, **report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: v for k, v in report.items() if k not in ("rss_samples", "worker_kills")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
