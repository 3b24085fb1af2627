"""Can one ``andes-loadgen`` process hold 2,000 concurrent streams and still send on time?

A local sim cluster (two workers with KV for everyone, so nothing queues on the server side)
receives a trace of 2,000 requests at 200/s whose responses (1,000 tokens at 100 tok/s of
reading speed: about 10 s) keep them all streaming, then 600 more at 20/s while they stream.
The figure is the loadgen's own send lag (actual - intended send time) while it reads 2,000
streams; goal p99 <= 10 ms. The cluster shares this machine's cores with the client; ``--realtime``
repeats each run with the client at real-time priority (``chrt -r 1``, where permitted) to
tell the client's own cost from the competition for CPU. About 8 minutes per run. Writes
benchmarks/results/loadgen_lag.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from andes.up import ClusterConfig, LocalCluster, free_port
from andes.workload import Workload

RESULTS = Path(__file__).resolve().parent / "results" / "loadgen_lag.json"


def trace(first: int, first_rate: float, more: int, more_rate: float) -> Workload:
    arrivals = np.concatenate([
        np.arange(first) / first_rate,
        first / first_rate + np.arange(more) / more_rate,
    ])
    n = arrivals.size
    return Workload(
        arrival_s=arrivals,
        prompt_tokens=np.full(n, 16, dtype=np.int64),
        output_tokens=np.full(n, 1000, dtype=np.int64),
        ttft_s=np.full(n, 1.0),
        tds=np.full(n, 100.0),
    )


def run_loadgen(target: str, trace_path: Path, out: Path, *, realtime: bool) -> dict[str, object]:
    argv = [sys.executable, "-m", "loadgen", "run", "--target", target, "--trace",
            str(trace_path), "--json", str(out), "--quiet"]
    if realtime:
        argv = ["chrt", "-r", "1", *argv]
    subprocess.run(argv, check=False, timeout=900)
    (row,) = json.loads(out.read_text())["results"]
    return {
        "target": target.split(":")[0],
        "realtime_client": realtime,
        "requests": row["requests"],
        "completed": row["completed"],
        "errors": row["errors"],
        "streams_contiguous": row["streams_contiguous"],
        "send_lag": row["send_lag"],
        "valid": row["valid"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--transports", default="grpc,http")
    parser.add_argument("--realtime", action="store_true",
                        help="also run each with the client at real-time priority")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "trace.jsonl"
        trace(args.streams, 200.0, args.streams * 3 // 10, 20.0).to_jsonl(trace_path)
        config = ClusterConfig(
            backend="sim", workers=2, policy="andes", profile="a100-opt13b",
            gateway_port=free_port(), scheduler_port=free_port(), http_port=free_port(),
            worker_args=("--kv-blocks", "100000"),
        )
        with LocalCluster(config) as cluster:
            modes = [False] + ([True] if args.realtime and shutil.which("chrt") else [])
            targets = {"grpc": f"grpc://{cluster.gateway_addr}",
                       "http": f"http://{cluster.http_addr}/v1"}
            for target in (targets[name] for name in args.transports.split(",")):
                for realtime in modes:
                    row = run_loadgen(target, trace_path, Path(tmp) / "out.json",
                                      realtime=realtime)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"streams": args.streams, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
