"""Andes with and without planned (recompute) preemption and prefill pacing, on the same
seeded workloads.

The defaults (``max_preemptions=1``, ``pace_prefill=True``) rest on this comparison; it writes
benchmarks/results/preemption_ablation.json (and prints one JSON line per run).
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from andes.latency import load_profile
from andes.policies import AndesPolicy
from andes.sim.simulator import SimConfig, simulate
from andes.workload import make_workload

RESULTS = Path(__file__).resolve().parent / "results" / "preemption_ablation.json"
SCENARIOS = (
    ("a100-opt13b", "poisson", (8.0, 10.0, 12.0, 13.0)),
    ("a100-opt13b", "gamma:3", (7.0, 9.0)),
    ("a40-opt13b", "poisson", (2.0, 2.5)),
)
VARIANTS = {
    "cap 1, paced (default)": {},
    "no preemption, paced": {"max_preemptions": 0},
    "cap 1, unpaced": {"pace_prefill": False},
    "no preemption, unpaced": {"max_preemptions": 0, "pace_prefill": False},
}


def run(profile_name: str, arrival: str, rate: float, label: str, duration: float) -> dict:
    workload = make_workload("sharegpt", "reading", arrival, rate, duration_s=duration, seed=1)
    policy = AndesPolicy(**VARIANTS[label])  # type: ignore[arg-type]
    summary = simulate(workload, policy, SimConfig(profile=load_profile(profile_name))).summary()
    row = {
        "profile": profile_name,
        "arrival": arrival,
        "rate": rate,
        "variant": label,
        **{
            key: round(float(summary[key]), 4)  # type: ignore[arg-type]
            for key in ("avg_qoe", "p10_qoe", "throughput_tok_s", "preemptions_per_request")
        },
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    points = [
        (profile_name, arrival, rate, label)
        for profile_name, arrival, rates in SCENARIOS
        for rate in rates
        for label in VARIANTS
    ]
    with ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        rows = list(
            pool.map(run, *zip(*points, strict=True), [args.duration] * len(points))
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
