"""How fast the simulator runs: one hour of traffic at FCFS's capacity rate on a100-opt13b.

Goal: at most 2 minutes of wall time per policy on a 2-core machine. Writes
benchmarks/results/sim_speed.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from andes.latency import load_profile
from andes.policies import make_policy
from andes.sim.simulator import SimConfig, simulate
from andes.workload import make_workload

RESULTS = Path(__file__).resolve().parent / "results" / "sim_speed.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=7.3, help="FCFS's capacity (req/s)")
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--policies", default="fcfs,andes")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    profile = load_profile("a100-opt13b")
    workload = make_workload(
        "sharegpt", "reading", "poisson", args.rate, duration_s=args.duration, seed=1
    )
    rows = []
    for name in args.policies.split(","):
        result = simulate(workload, make_policy(name), SimConfig(profile=profile))
        summary = result.summary()
        row = {
            "policy": name,
            "rate": args.rate,
            "simulated_s": args.duration,
            "requests": len(workload),
            "iterations": result.iterations,
            "wall_s": round(result.wall_seconds, 2),
            "avg_qoe": round(float(summary["avg_qoe"]), 4),  # type: ignore[arg-type]
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
