"""Andes with and without planned (recompute) preemption, on the same seeded workloads.

The default ``max_preemptions=0`` rests on this comparison; it writes
benchmarks/results/preemption_ablation.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from andes.latency import load_profile
from andes.policies import AndesPolicy
from andes.sim.simulator import SimConfig, simulate
from andes.workload import make_workload

RESULTS = Path(__file__).resolve().parent / "results" / "preemption_ablation.json"
SCENARIOS = (
    ("a100-opt13b", "poisson", (8.0, 10.0, 12.0)),
    ("a100-opt13b", "gamma:3", (7.0, 9.0)),
    ("a40-opt13b", "poisson", (2.0, 2.5)),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants = {
        "no preemption (default)": AndesPolicy(),
        "cap 1 + refiner": AndesPolicy(max_preemptions=1),
    }
    rows = []
    for profile_name, arrival, rates in SCENARIOS:
        profile = load_profile(profile_name)
        for rate in rates:
            workload = make_workload(
                "sharegpt", "reading", arrival, rate, duration_s=args.duration, seed=1
            )
            for label, policy in variants.items():
                summary = simulate(workload, policy, SimConfig(profile=profile)).summary()
                row = {
                    "profile": profile_name,
                    "arrival": arrival,
                    "rate": rate,
                    "variant": label,
                    **{
                        key: round(float(summary[key]), 4)  # type: ignore[arg-type]
                        for key in ("avg_qoe", "p10_qoe", "throughput_tok_s",
                                    "preemptions_per_request")
                    },
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
