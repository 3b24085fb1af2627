"""The demo: the same bursty workload through a real local cluster, once per policy.

For each policy it brings up Redis, the scheduler, two sim workers and the gateway as real
processes (:mod:`andes.up`), sends the workload open-loop through the gateway's gRPC API
(:mod:`loadgen.driver`), measures QoE at the client, tears the cluster down, and also runs the
simulator on the identical workload so the two can be compared: the services should add no
hidden loss.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from andes.latency import load_profile
from andes.metrics import summarize
from andes.policies import make_policy
from andes.sim.simulator import SimConfig, simulate
from andes.up import ClusterConfig, LocalCluster, free_port
from andes.workload import Workload, make_workload


@dataclass(frozen=True)
class DemoConfig:
    profile: str = "a100-opt13b"
    workers: int = 2
    kv_blocks: int = 300
    """KV blocks per worker: small, so memory is the bottleneck as on a loaded GPU, while the
    token rate stays within what one 2-core machine can emulate and deliver."""
    rate: float = 8.0
    duration_s: float = 30.0
    arrival: str = "burst:2,0.35,20"
    seed: int = 7
    backend: str = "sim"
    model: str | None = None
    """Model directory of the ``vllm`` backend."""
    worker_args: tuple[str, ...] = ()
    """Engine flags beyond ``--kv-blocks`` (block size, lengths, dtype for vllm)."""
    scheduler_args: tuple[str, ...] = ()

    def workload(self) -> Workload:
        return make_workload(
            "sharegpt", "reading", self.arrival, self.rate, duration_s=self.duration_s,
            seed=self.seed,
        )


VLLM_BLOCK_SIZE = 32


def vllm_demo_config(model: str, rate: float, duration_s: float) -> DemoConfig:
    """The CPU demo on a real engine: one vllm worker on the tiny model with 96 KV blocks of
    32 tokens (about five chat requests at once, so memory is the bottleneck as on a loaded
    GPU). The simulator side uses the measured ``cpu-tiny`` profile with the same budget."""
    return DemoConfig(
        profile="cpu-tiny", workers=1, kv_blocks=96, rate=rate, duration_s=duration_s,
        backend="vllm", model=model,
        worker_args=("--dtype", "float32", "--block-size", str(VLLM_BLOCK_SIZE),
                     "--max-model-len", "3072", "--max-batched-tokens", "1024",
                     "--max-batch", "64"),
    )


def run_policy(config: DemoConfig, policy: str, workload: Workload) -> dict[str, Any]:
    """One policy through the real services, plus the simulator's figures for comparison."""
    # Imported here: the driver pulls in gRPC, which the simulator-only commands do not need.
    from loadgen.driver import drive

    profile = dataclasses.replace(load_profile(config.profile), kv_blocks_total=config.kv_blocks)
    if config.backend == "vllm":
        profile = dataclasses.replace(profile, block_size=VLLM_BLOCK_SIZE)
    cluster_config = ClusterConfig(
        backend=config.backend,
        model=config.model,
        workers=config.workers,
        policy=policy,
        profile=config.profile,
        gateway_port=free_port(),
        scheduler_port=free_port(),
        worker_args=("--kv-blocks", str(config.kv_blocks), *config.worker_args),
        scheduler_args=config.scheduler_args,
    )
    started = time.monotonic()
    with LocalCluster(cluster_config) as cluster:
        result = asyncio.run(drive(cluster.gateway_addr, workload, run_id=f"demo-{policy}-"
                                   f"{int(time.time())}"))
    outcomes = result.outcomes()
    measured = summarize(outcomes)
    simulated = simulate(
        workload, make_policy(policy), SimConfig(profile=profile, num_workers=config.workers)
    ).summary()
    return {
        "policy": policy,
        "requests": len(workload),
        "completed": len(outcomes),
        "errors": result.errors,
        "streams_contiguous": all(r.indices_ok for r in result.records),
        "send_lag_max_ms": float(1e3 * max(result.send_lag_s.max(initial=0.0), 0.0)),
        "wall_s": time.monotonic() - started,
        "measured": measured,
        "simulated": {k: simulated[k] for k in ("avg_qoe", "p10_qoe", "ttft_p90_s",
                                                  "throughput_tok_s")},
        "qoe": outcomes.qoe.tolist(),
        "ttft_s": (outcomes.first_token_s - outcomes.arrival_s).tolist(),
    }


def plot_demo(rows: list[dict[str, Any]], path: Path) -> None:
    """Average QoE measured vs simulated, and the measured QoE and TTFT distributions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, qoe_cdf, ttft_cdf) = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [row["policy"] for row in rows]
    x = np.arange(len(rows))
    bars.bar(x - 0.2, [row["measured"]["avg_qoe"] for row in rows], 0.4, label="cluster")
    bars.bar(x + 0.2, [row["simulated"]["avg_qoe"] for row in rows], 0.4, label="simulator")
    bars.set_xticks(x, names)
    bars.set_ylim(0, 1)
    bars.set_title("average QoE")
    bars.legend()
    for row in rows:
        qoe = np.sort(np.asarray(row["qoe"]))
        ttft = np.sort(np.asarray(row["ttft_s"]))
        fraction = np.arange(1, qoe.size + 1) / max(qoe.size, 1)
        qoe_cdf.plot(qoe, fraction, label=row["policy"])
        ttft_cdf.plot(np.maximum(ttft, 1e-3), fraction, label=row["policy"])
    qoe_cdf.set_title("QoE CDF (measured at the client)")
    qoe_cdf.set_xlabel("QoE")
    ttft_cdf.set_title("TTFT CDF (measured at the client)")
    ttft_cdf.set_xscale("log")
    ttft_cdf.set_xlabel("TTFT (s)")
    for axis in (qoe_cdf, ttft_cdf):
        axis.set_ylabel("fraction of requests")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
