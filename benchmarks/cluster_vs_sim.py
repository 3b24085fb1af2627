"""The real services against the simulator, on one bursty workload that overloads them.

Two sim workers (A100-class profile with 400 KV blocks each, so memory is the bottleneck),
ShareGPT-like requests at 10 req/s on average in bursts of twice that, 120 s of arrivals:
each policy runs through a real local cluster (andes up's processes, the gateway's gRPC API,
QoE measured at the client) and through the simulator on the identical workload. Goals:
Andes's average QoE at least 2x FCFS's, and the cluster within 0.03 of the simulator.
Writes benchmarks/results/cluster_vs_sim.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from andes.demo import DemoConfig, run_policy

RESULTS = Path(__file__).resolve().parent / "results" / "cluster_vs_sim.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--kv-blocks", type=int, default=400)
    parser.add_argument("--policies", default="fcfs,andes")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    config = DemoConfig(kv_blocks=args.kv_blocks, rate=args.rate, duration_s=args.duration)
    workload = config.workload()
    rows = []
    for policy in args.policies.split(","):
        row = run_policy(config, policy, workload)
        row.pop("qoe")
        row.pop("ttft_s")
        row["qoe_difference_cluster_minus_sim"] = (
            row["measured"]["avg_qoe"] - row["simulated"]["avg_qoe"]
        )
        print(json.dumps({k: row[k] for k in ("policy", "requests", "completed", "errors",
                                               "streams_contiguous", "wall_s")}
                         | {"cluster_avg_qoe": row["measured"]["avg_qoe"],
                            "sim_avg_qoe": row["simulated"]["avg_qoe"]}), flush=True)
        rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = {"config": dataclasses.asdict(config), "rows": rows}
    args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
