"""How long one Andes plan takes for a worker holding 1,000 and 10,000 unfinished requests.

The snapshot is an overloaded a100-opt13b worker (andes.sim.snapshots), so the full solver
runs every time. Writes benchmarks/results/planner.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from andes.sim.snapshots import time_planner

RESULTS = Path(__file__).resolve().parent / "results" / "planner.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policy", default="andes")
    parser.add_argument("--requests", default="1000,10000", help="comma-separated counts")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for count in (int(n) for n in args.requests.split(",")):
        row = time_planner(args.policy, count, repeats=args.repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
