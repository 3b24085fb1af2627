"""Stock ``vllm serve`` against our cluster (fcfs, andes), side by side, over the OpenAI API.

Same tiny model, same engine settings and KV budget, same seeded bursty workload sent by
``andes-loadgen run`` to each target's ``/v1/completions``:

* **vllm**: vLLM's own OpenAI server (``vllm serve``; its default FCFS scheduler);
* **fcfs** / **andes**: ``andes up --backend vllm`` with that policy, through the gateway's
  OpenAI-compatible HTTP API.

Then ``andes-loadgen report`` writes the side-by-side table and plots. Goal: ours with
``andes`` at least 2x stock vLLM's average QoE at this overloaded rate, with at most 10% less
output throughput. Results in benchmarks/results/vs_vllm/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from andes.demo import VLLM_BLOCK_SIZE
from andes.up import ClusterConfig, LocalCluster, free_port

RESULTS = Path(__file__).resolve().parent / "results" / "vs_vllm"
KV_BLOCKS = 96
ENGINE = {"dtype": "float32", "max-model-len": "3072", "max-num-batched-tokens": "1024",
          "max-num-seqs": "64", "block-size": str(VLLM_BLOCK_SIZE)}


SYSTEMS = ("vllm", "fcfs", "andes")
"""Stock vLLM's server, then our cluster with each policy."""


def loadgen(target: str, out: Path, args: argparse.Namespace) -> None:
    subprocess.run(
        [sys.executable, "-m", "loadgen", "run", "--target", target, "--workload", "sharegpt",
         "--qoe-mix", "reading", "--arrival", args.arrival, "--rate", str(args.rate),
         "--duration", str(args.duration), "--seed", str(args.seed), "--json", str(out),
         "--quiet"],
        check=True,
    )


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("vllm serve exited")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError("vllm serve did not come up")


def run_stock(model: str, out: Path, args: argparse.Namespace, log: Path) -> None:
    port = free_port()
    flags = [f"--{k}={v}" for k, v in ENGINE.items()]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("wb") as sink:
        server = subprocess.Popen(
            # vLLM's OpenAI server, as `vllm serve` runs it (the `vllm` command of the CPU
            # wheel looks itself up under the GPU wheel's name and fails).
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
             f"--num-gpu-blocks-override={args.kv_blocks + 1}", "--enforce-eager",
             "--served-model-name", "tiny", *flags],
            stdout=sink, stderr=subprocess.STDOUT, env=env,
        )
        try:
            _wait_http(f"http://127.0.0.1:{port}/v1/models", server)
            loadgen(f"http://127.0.0.1:{port}/v1", out, args)
        finally:
            server.terminate()
            server.wait(timeout=60)


def run_ours(model: str, policy: str, out: Path, args: argparse.Namespace) -> None:
    scheduler_args: tuple[str, ...] = ()
    if policy == "andes" and args.max_preemptions is not None:
        scheduler_args = ("--max-preemptions", str(args.max_preemptions))
    worker_args = ["--kv-blocks", str(args.kv_blocks), "--max-batch", ENGINE["max-num-seqs"],
                   "--max-batched-tokens", ENGINE["max-num-batched-tokens"],
                   "--dtype", ENGINE["dtype"], "--max-model-len", ENGINE["max-model-len"],
                   "--block-size", ENGINE["block-size"]]
    config = ClusterConfig(backend="vllm", model=model, workers=1, policy=policy,
                           gateway_port=free_port(), scheduler_port=free_port(),
                           http_port=free_port(), worker_args=tuple(worker_args),
                           scheduler_args=scheduler_args)
    with LocalCluster(config) as cluster:
        loadgen(f"http://{cluster.http_addr}/v1", out, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="model directory (default: build the --shape model)")
    parser.add_argument("--shape", default="tiny", choices=("tiny", "small"),
                        help="without --model: the `andes model tiny --shape` to build")
    parser.add_argument("--rate", type=float, default=6.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--arrival", default="burst:2,0.35,20")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--kv-blocks", type=int, default=KV_BLOCKS,
                        help=f"KV budget of every engine, in blocks of {VLLM_BLOCK_SIZE} tokens "
                             f"(default {KV_BLOCKS})")
    parser.add_argument("--max-preemptions", type=int,
                        help="andes: planned preemptions per request (default: the policy's, 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="the systems to run (the others' results are read from --out, "
                             "from an earlier run with the same workload)")
    args = parser.parse_args()
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"--systems: unknown {', '.join(sorted(unknown))} (known: "
                     f"{', '.join(SYSTEMS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    files = {name: args.out / f"{name}.json" for name in SYSTEMS}
    if missing := [name for name in SYSTEMS if name not in systems and not files[name].exists()]:
        parser.error(f"no earlier results in {args.out} for {', '.join(missing)}: run them too")
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            from andes.tiny_model import build_tiny_model

            model = str(build_tiny_model(Path(scratch) / args.shape, shape=args.shape))
        if "vllm" in systems:
            run_stock(model, files["vllm"], args, Path(scratch) / "vllm-serve.log")
        for policy in ("fcfs", "andes"):
            if policy in systems:
                run_ours(model, policy, files[policy], args)
    subprocess.run([sys.executable, "-m", "loadgen", "report", *map(str, files.values()),
                    "--out", str(args.out)], check=True)
    rows = {name: json.loads(path.read_text())["results"][0] for name, path in files.items()}
    stock, andes = rows["vllm"], rows["andes"]
    summary = {
        "command": "python benchmarks/vs_vllm.py " + " ".join(sys.argv[1:]),
        "avg_qoe": {name: row["avg_qoe"] for name, row in rows.items()},
        "throughput_tok_s": {name: row["throughput_tok_s"] for name, row in rows.items()},
        "andes_over_stock_avg_qoe": andes["avg_qoe"] / stock["avg_qoe"],
        "andes_over_stock_throughput": andes["throughput_tok_s"] / stock["throughput_tok_s"],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
